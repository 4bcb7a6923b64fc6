import { describe, expect, it } from "vitest";
import { safetensorsBytes } from "../../test/checkpoint-files.ts";
import { thrown } from "../../test/helpers.ts";
import {
  checkUniqueNames,
  DTYPE_BITS,
  encodeHeader,
  headerLength,
  MAX_HEADER_BYTES,
  parseHeader,
  SafetensorsError,
} from "./safetensors.ts";

const file = safetensorsBytes;

const ok = {
  a: { dtype: "F32", shape: [2, 3], data_offsets: [0, 24] },
  b: { dtype: "BF16", shape: [4], data_offsets: [24, 32] },
};

describe("parseHeader accepts valid files", () => {
  it("reads tensors with absolute offsets and the metadata", () => {
    const bytes = file({ __metadata__: { format: "pt" }, ...ok }, 32);
    const h = parseHeader(bytes, bytes.byteLength, "m.safetensors");
    expect(h.metadata).toEqual({ format: "pt" });
    expect(h.tensors.map((t) => [t.name, t.begin - h.dataStart, t.end - h.dataStart])).toEqual([
      ["a", 0, 24],
      ["b", 24, 32],
    ]);
  });

  it.each([
    ["F4 with an even element count", { x: { dtype: "F4", shape: [4], data_offsets: [0, 2] } }, 2],
    ["a scalar", { x: { dtype: "F64", shape: [], data_offsets: [0, 8] } }, 8],
    ["an empty tensor", { x: { dtype: "F32", shape: [0, 5], data_offsets: [0, 0] } }, 0],
    ["F8_E4M3", { x: { dtype: "F8_E4M3", shape: [3], data_offsets: [0, 3] } }, 3],
  ])("accepts %s", (_name, header, data) => {
    const bytes = file(header, data);
    expect(parseHeader(bytes, bytes.byteLength, "f").tensors).toHaveLength(1);
  });

  it("round-trips what encodeHeader writes", () => {
    const header = encodeHeader([
      { name: "w", dtype: "BF16", shape: [3, 5], bytes: 30 },
      { name: "名前", dtype: "U8", shape: [2], bytes: 2 },
    ]);
    expect(header.byteLength % 8).toBe(0);
    const bytes = new Uint8Array(header.byteLength + 32);
    bytes.set(header);
    const h = parseHeader(bytes, bytes.byteLength, "f");
    expect(h.tensors.map((t) => t.name)).toEqual(["w", "名前"]);
  });
});

describe("parseHeader names the file, the tensor and the rule", () => {
  const cases: [string, Uint8Array, RegExp][] = [
    ["a file shorter than 8 bytes", new Uint8Array(5), /too short for a header length/],
    [
      "a header length past the file",
      (() => {
        const b = file(ok, 32);
        new DataView(b.buffer).setBigUint64(0, 1n << 40n, true);
        return b;
      })(),
      /header length \(the first 8 bytes\) is outside 2\.\.104857600$/,
    ],
    [
      "a header length past the end",
      (() => {
        const b = file(ok, 0);
        new DataView(b.buffer).setBigUint64(0, BigInt(b.byteLength), true);
        return b;
      })(),
      /exceeds the file/,
    ],
    [
      "JSON that does not parse",
      (() => {
        const b = file(ok, 32);
        b[9] = 0x7b;
        b[10] = 0x7b;
        return b;
      })(),
      /header is not valid UTF-8 JSON/,
    ],
    ["a JSON array", file([1, 2], 0), /not a JSON object/],
    [
      "an unknown dtype",
      file({ x: { dtype: "F12", shape: [1], data_offsets: [0, 2] } }, 2),
      /tensor "x": dtype "F12" is not one of/,
    ],
    [
      "a negative dimension",
      file({ x: { dtype: "U8", shape: [-1], data_offsets: [0, 1] } }, 1),
      /tensor "x": shape \[-1\]/,
    ],
    ["a fractional dimension", file({ x: { dtype: "U8", shape: [1.5], data_offsets: [0, 1] } }, 1), /shape/],
    [
      "a size mismatch",
      file({ x: { dtype: "F32", shape: [2], data_offsets: [0, 4] } }, 4),
      /needs 8 bytes but data_offsets span 4/,
    ],
    ["reversed offsets", file({ x: { dtype: "U8", shape: [0], data_offsets: [4, 0] } }, 4), /0 <= begin <= end/],
    [
      "offsets past the file",
      file({ x: { dtype: "U8", shape: [8], data_offsets: [0, 8] } }, 4),
      /run past the end of the file/,
    ],
    [
      "overlapping tensors",
      file(
        { x: { dtype: "U8", shape: [8], data_offsets: [0, 8] }, y: { dtype: "U8", shape: [4], data_offsets: [6, 10] } },
        10,
      ),
      /tensor "y": bytes overlap those of tensor "x"/,
    ],
    [
      "an odd F4 count",
      file({ x: { dtype: "F4", shape: [3], data_offsets: [0, 2] } }, 2),
      /not a whole number of bytes/,
    ],
    [
      "an unknown field",
      file({ x: { dtype: "U8", shape: [1], data_offsets: [0, 1], extra: 1 } }, 1),
      /unknown field "extra"/,
    ],
    ["metadata with a number", file({ __metadata__: { a: 1 } }, 0), /__metadata__ is not an object of strings/],
    ["an entry that is not an object", file({ x: 3 }, 0), /tensor "x": entry is not an object/],
  ];
  it.each(cases)("rejects %s", (_name, bytes, message) => {
    const run = () => parseHeader(bytes, bytes.byteLength, "dir/m.safetensors");
    expect(run).toThrow(SafetensorsError);
    expect(run).toThrow(message);
    expect(run).toThrow(/^dir\/m.safetensors: /);
  });

  // Exact messages: a looser pattern also matches what a weaker check says about the same file.
  const dtypes = Object.keys(DTYPE_BITS).join(", ");
  it.each([
    [
      "a negative dimension",
      { x: { dtype: "U8", shape: [-1], data_offsets: [0, 1] } },
      1,
      'tensor "x": shape [-1] is not a list of non-negative integers',
    ],
    [
      "a span larger than shape x dtype",
      { x: { dtype: "F32", shape: [1], data_offsets: [0, 8] } },
      8,
      'tensor "x": shape [1] of F32 needs 4 bytes but data_offsets span 8',
    ],
    [
      "an overlap with a tensor other than the first",
      {
        x: { dtype: "U8", shape: [4], data_offsets: [0, 4] },
        y: { dtype: "U8", shape: [4], data_offsets: [4, 8] },
        z: { dtype: "U8", shape: [4], data_offsets: [6, 10] },
      },
      10,
      'tensor "z": bytes overlap those of tensor "y"',
    ],
    ...["toString", "constructor", "__proto__", "hasOwnProperty"].map((dtype) => [
      `the Object property "${dtype}" as dtype`,
      { x: { dtype, shape: [1], data_offsets: [0, 1] } },
      1,
      `tensor "x": dtype "${dtype}" is not one of ${dtypes}`,
    ]),
  ] as [string, unknown, number, string][])("rejects %s with the exact rule", (_name, header, data, rule) => {
    const bytes = file(header, data);
    const err = thrown(() => parseHeader(bytes, bytes.byteLength, "dir/m.safetensors"));
    expect(err).toBeInstanceOf(SafetensorsError);
    expect(err.message).toBe(`dir/m.safetensors: ${rule}`);
  });

  it("rejects a tensor name used by two files", () => {
    expect(() =>
      checkUniqueNames([
        { file: "a.safetensors", tensors: [{ name: "w" }] },
        { file: "b.safetensors", tensors: [{ name: "w" }] },
      ]),
    ).toThrow('b.safetensors: tensor "w": also defined in a.safetensors');
  });
});

/** Deterministic PRNG so a failing fuzz case can be replayed. */
function rng(seed: number) {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

describe("fuzzing parseHeader", () => {
  const base = file(
    {
      __metadata__: { format: "pt" },
      "model.embed.weight": { dtype: "BF16", shape: [4, 8], data_offsets: [0, 64] },
      "model.norm.weight": { dtype: "F32", shape: [8], data_offsets: [64, 96] },
      "lm_head.weight": { dtype: "F16", shape: [2, 8], data_offsets: [96, 128] },
    },
    128,
  );

  it("never crashes or accepts an invalid layout under random mutations and truncations", () => {
    const random = rng(12345);
    let accepted = 0;
    let rejected = 0;
    for (let iter = 0; iter < 20000; iter++) {
      let bytes = base.slice();
      const kind = random();
      if (kind < 0.4) {
        const flips = 1 + Math.floor(random() * 4);
        for (let i = 0; i < flips; i++) bytes[Math.floor(random() * bytes.byteLength)] = Math.floor(random() * 256);
      } else if (kind < 0.7) {
        bytes = bytes.subarray(0, Math.floor(random() * bytes.byteLength));
      } else {
        // Mutate inside the JSON: swap a digit or a structural character for another one.
        const pool = '0123456789[]{},:"-.eE ';
        const pos = 8 + Math.floor(random() * (bytes.byteLength - 8 - 128));
        bytes[pos] = pool.charCodeAt(Math.floor(random() * pool.length));
      }
      try {
        const h = parseHeader(bytes, bytes.byteLength, "f");
        accepted++;
        // Whatever is accepted must be a sound layout.
        let end = 0;
        for (const t of h.tensors) {
          expect(t.begin).toBeGreaterThanOrEqual(h.dataStart);
          expect(t.end).toBeLessThanOrEqual(bytes.byteLength);
          if (t.end > t.begin) {
            expect(t.begin).toBeGreaterThanOrEqual(end);
            end = t.end;
          }
        }
      } catch (err) {
        if (!(err instanceof SafetensorsError)) throw err;
        rejected++;
      }
    }
    expect(accepted).toBeGreaterThan(0);
    expect(rejected).toBeGreaterThan(0);
  });
});

describe("headerLength bounds", () => {
  /** The first 8 bytes saying `len`, then `extra` zero bytes. */
  function prefix(len: bigint, extra = 0): Uint8Array {
    const b = new Uint8Array(8 + extra);
    new DataView(b.buffer).setBigUint64(0, len, true);
    return b;
  }

  it("accepts the smallest and the largest length the format allows", () => {
    expect(headerLength(prefix(2n), 10, "f")).toBe(2);
    expect(headerLength(prefix(BigInt(MAX_HEADER_BYTES)), 8 + MAX_HEADER_BYTES, "f")).toBe(MAX_HEADER_BYTES);
  });

  it.each([
    ["a length of 1", prefix(1n), 100],
    ["a length of 0", prefix(0n), 100],
    ["a length one past the cap", prefix(BigInt(MAX_HEADER_BYTES) + 1n), 2 * MAX_HEADER_BYTES],
  ])("refuses %s", (_case, bytes, size) => {
    const err = thrown(() => headerLength(bytes, size, "f"));
    expect(err).toBeInstanceOf(SafetensorsError);
    expect(err.message).toBe(`f: header length (the first 8 bytes) is outside 2..${MAX_HEADER_BYTES}`);
  });

  it("refuses a file of exactly 8 bytes as having no room for the header", () => {
    expect(thrown(() => headerLength(prefix(2n), 8, "f")).message).toBe(
      "f: header length (the first 8 bytes) exceeds the file of 8 bytes",
    );
  });

  it("refuses a file under 8 bytes, and a prefix under 8 bytes of a larger file", () => {
    // A prefix that holds more bytes than the file claims, and the reverse.
    for (const [bytes, size] of [
      [prefix(2n, 8), 7],
      [new Uint8Array(5), 100],
    ] as [Uint8Array, number][]) {
      const err = thrown(() => headerLength(bytes, size, "f"));
      expect(err).toBeInstanceOf(SafetensorsError);
      expect(err.message).toBe(`f: file of ${size} bytes is too short for a header length`);
    }
  });
});

describe("parseHeader, more rules", () => {
  it("names its errors SafetensorsError, with the file, tensor and rule apart", () => {
    const bytes = file({ x: { dtype: "U8", shape: [2], data_offsets: [0, 1] } }, 1);
    const err = thrown(() => parseHeader(bytes, bytes.byteLength, "m")) as SafetensorsError;
    expect(err.name).toBe("SafetensorsError");
    expect([err.file, err.tensor, err.rule]).toEqual([
      "m",
      "x",
      "shape [2] of U8 needs 2 bytes but data_offsets span 1",
    ]);
  });

  it("says the header is truncated when the bytes given stop before its end", () => {
    const bytes = file(ok, 32);
    const err = thrown(() => parseHeader(bytes.subarray(0, 20), bytes.byteLength, "m"));
    expect(err.message).toBe("m: header is truncated");
  });

  it("refuses a header that is not UTF-8, even inside a string", () => {
    const bytes = file({ "X-name": { dtype: "U8", shape: [1], data_offsets: [0, 1] } }, 1);
    bytes[bytes.indexOf(0x58)] = 0xff; // the X
    expect(thrown(() => parseHeader(bytes, bytes.byteLength, "m")).message).toBe("m: header is not valid UTF-8 JSON");
  });

  it("accepts an empty header object", () => {
    const bytes = file({}, 0);
    expect(parseHeader(bytes, bytes.byteLength, "m")).toEqual({ dataStart: 10, tensors: [], metadata: {} });
  });

  it("lists the tensors in file order whatever the header's order, empty ones first at a tie", () => {
    const bytes = file(
      {
        y: { dtype: "U8", shape: [4], data_offsets: [4, 8] },
        e: { dtype: "U8", shape: [0], data_offsets: [4, 4] },
        w: { dtype: "U8", shape: [4], data_offsets: [0, 4] },
      },
      8,
    );
    expect(parseHeader(bytes, bytes.byteLength, "m").tensors.map((t) => t.name)).toEqual(["w", "e", "y"]);
  });

  it("accepts an empty tensor anywhere, also inside another's bytes", () => {
    const bytes = file(
      {
        x: { dtype: "U8", shape: [8], data_offsets: [0, 8] },
        e: { dtype: "F32", shape: [2, 0], data_offsets: [4, 4] },
        z: { dtype: "U8", shape: [2], data_offsets: [8, 10] },
      },
      10,
    );
    const h = parseHeader(bytes, bytes.byteLength, "m");
    expect(h.tensors.map((t) => [t.name, t.begin - h.dataStart, t.end - h.dataStart])).toEqual([
      ["x", 0, 8],
      ["e", 4, 4],
      ["z", 8, 10],
    ]);
  });

  const dtypes = Object.keys(DTYPE_BITS).join(", ");
  it.each([
    [
      "an empty tensor name",
      { "": { dtype: "U8", shape: [1], data_offsets: [0, 1] } },
      1,
      'tensor "": empty tensor name',
    ],
    ["a null entry", { x: null }, 0, 'tensor "x": entry is not an object'],
    ["an array entry", { x: ["U8", [1], [0, 1]] }, 1, 'tensor "x": entry is not an object'],
    ["no dtype", { x: { shape: [1], data_offsets: [0, 1] } }, 1, `tensor "x": dtype undefined is not one of ${dtypes}`],
    [
      "a numeric dtype",
      { x: { dtype: 8, shape: [1], data_offsets: [0, 1] } },
      1,
      `tensor "x": dtype 8 is not one of ${dtypes}`,
    ],
    [
      "no shape",
      { x: { dtype: "U8", data_offsets: [0, 1] } },
      1,
      'tensor "x": shape undefined is not a list of non-negative integers',
    ],
    ...[[-1, 0], [0.5, 1.5], [0, -1], ["0", "1"], [0, 1, 2], [1]].map((offsets) => [
      `data_offsets ${JSON.stringify(offsets)}`,
      { x: { dtype: "U8", shape: [1], data_offsets: offsets } },
      4,
      `tensor "x": data_offsets ${JSON.stringify(offsets)} is not [begin, end] with 0 <= begin <= end`,
    ]),
    [
      "a span that does not start at 0 and is too long",
      { x: { dtype: "F32", shape: [1], data_offsets: [4, 12] } },
      12,
      'tensor "x": shape [1] of F32 needs 4 bytes but data_offsets span 8',
    ],
    [
      "offsets past the data",
      { x: { dtype: "U8", shape: [4], data_offsets: [4, 8] } },
      6,
      'tensor "x": data_offsets [4, 8] run past the end of the file (6 data bytes)',
    ],
    ["a JSON null header", null, 0, "header is not a JSON object"],
    ["null metadata", { __metadata__: null }, 0, "__metadata__ is not an object of strings"],
    [
      "metadata with one string and one number",
      { __metadata__: { a: "x", b: 1 } },
      0,
      "__metadata__ is not an object of strings",
    ],
  ] as [string, unknown, number, string][])("rejects %s with the exact rule", (_name, header, data, rule) => {
    const bytes = file(header, data);
    const err = thrown(() => parseHeader(bytes, bytes.byteLength, "m"));
    expect(err).toBeInstanceOf(SafetensorsError);
    expect(err.message).toBe(`m: ${rule}`);
  });
});

describe("encodeHeader", () => {
  it("writes the metadata when given, and none otherwise", () => {
    const tensors = [{ name: "w", dtype: "U8", shape: [3], bytes: 3 }];
    const parse = (header: Uint8Array) => {
      const bytes = new Uint8Array(header.byteLength + 3);
      bytes.set(header);
      return parseHeader(bytes, bytes.byteLength, "f");
    };
    expect(parse(encodeHeader(tensors, { format: "pt" })).metadata).toEqual({ format: "pt" });
    const plain = encodeHeader(tensors);
    expect(new TextDecoder().decode(plain.subarray(8)).trimEnd()).toBe(
      JSON.stringify({ w: { dtype: "U8", shape: [3], data_offsets: [0, 3] } }),
    );
  });
});
