/** The URL peers reach this daemon at, when advertiseUrl does not say. */
import { networkInterfaces } from "node:os";

/**
 * `scheme://host:port`; for a wildcard host (0.0.0.0, ::) the first non-loopback address of
 * this machine (IPv4 first), else loopback. `interfaces` is a seam for tests.
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
      .filter((a) => !a.internal);
    const pick = all.find((a) => a.family === "IPv4") ?? all.find((a) => a.family === "IPv6");
    address = pick?.address ?? "127.0.0.1";
  }
  const at = address.includes(":") && !address.startsWith("[") ? `[${address}]` : address;
  return `${scheme}://${at}:${port}`;
}
