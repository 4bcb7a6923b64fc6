/** The URL peers reach this daemon at, when advertiseUrl does not say. */
import { networkInterfaces } from "node:os";

/**
 * `scheme://host:port`; for a wildcard host the first address of this machine that others can
 * reach (not loopback, not IPv6 link-local, which needs a zone): IPv4 for 0.0.0.0, IPv4 first
 * for ::; else loopback (the caller warns: peers elsewhere cannot reach that). `interfaces`
 * is a seam for tests.
 */
export function advertiseUrlOf(
  host: string,
  port: number,
  scheme: "http" | "https",
  interfaces: ReturnType<typeof networkInterfaces> = networkInterfaces(),
): string {
  let address = host;
  if (host === "0.0.0.0" || host === "::" || host === "") {
    const all = Object.values(interfaces)
      .flatMap((list) => list ?? [])
      .filter((a) => !a.internal && !/^fe[89ab]/i.test(a.address));
    const v4 = all.find((a) => a.family === "IPv4");
    const pick = host === "0.0.0.0" ? v4 : (v4 ?? all.find((a) => a.family === "IPv6"));
    address = pick?.address ?? "127.0.0.1";
  }
  const at = address.includes(":") && !address.startsWith("[") ? `[${address}]` : address;
  return `${scheme}://${at}:${port}`;
}
