import { describe, expect, it } from "vitest";
import { advertiseUrlOf } from "./advertise.ts";

const nic = (address: string, family: "IPv4" | "IPv6", internal = false) => ({
  address,
  family,
  internal,
  netmask: "",
  mac: "",
  cidr: null,
  ...(family === "IPv6" ? { scopeid: 0 } : {}),
});

describe("advertiseUrlOf", () => {
  it("takes the host it listens on", () => {
    expect(advertiseUrlOf("10.1.2.3", 8470, "https", {})).toBe("https://10.1.2.3:8470");
    expect(advertiseUrlOf("fd00::1", 8470, "http", {})).toBe("http://[fd00::1]:8470");
  });

  it("for a wildcard host, the first non-loopback address, IPv4 first", () => {
    const interfaces = {
      lo: [nic("127.0.0.1", "IPv4", true)],
      eth0: [nic("fe80::1", "IPv6"), nic("192.168.7.9", "IPv4")],
    } as never;
    expect(advertiseUrlOf("0.0.0.0", 1, "http", interfaces)).toBe("http://192.168.7.9:1");
    expect(advertiseUrlOf("::", 2, "http", { eth0: [nic("fd00::2", "IPv6")] } as never)).toBe("http://[fd00::2]:2");
    expect(advertiseUrlOf("0.0.0.0", 3, "http", { lo: [nic("127.0.0.1", "IPv4", true)] } as never)).toBe(
      "http://127.0.0.1:3",
    );
    // 0.0.0.0 listens on IPv4 only; a link-local IPv6 address needs a zone nobody else has
    expect(advertiseUrlOf("0.0.0.0", 4, "http", { eth0: [nic("fd00::2", "IPv6")] } as never)).toBe(
      "http://127.0.0.1:4",
    );
    expect(advertiseUrlOf("::", 5, "http", { eth0: [nic("fe80::9", "IPv6"), nic("fd00::3", "IPv6")] } as never)).toBe(
      "http://[fd00::3]:5",
    );
  });
});
