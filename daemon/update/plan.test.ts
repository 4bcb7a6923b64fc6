import { describe, expect, it } from "vitest";
import { layerOf, type PlanTensor, planBuckets, smallerBuckets } from "./plan.ts";

const t = (name: string, bytes: number, file = 0, offset = 0): PlanTensor => ({
  name,
  dtype: "U8",
  shape: [bytes],
  bytes,
  file,
  offset,
});

/** Compact view: per bucket, owner and pieces as name[begin,end)@slotOffset. */
function view(tensors: PlanTensor[], bucketBytes: number, gpus = 1) {
  const owners = Array.from({ length: gpus }, (_, g) => g);
  return planBuckets(tensors, { bucketBytes, owners, slots: 2 * gpus, align: 16 }).map(
    (b) => `${b.owner}:${b.pieces.map((p) => `${p.name}[${p.range[0]},${p.range[1]})@${p.slotOffset}`).join(" ")}`,
  );
}

describe("planBuckets", () => {
  it.each([
    {
      name: "packs small tensors, aligning offsets",
      tensors: [t("a", 10, 0, 0), t("b", 20, 0, 10), t("c", 5, 0, 30)],
      bucketBytes: 64,
      want: ["0:b[0,20)@0 a[0,10)@32 c[0,5)@48"],
    },
    {
      name: "starts a new bucket for a tensor that does not fit",
      tensors: [t("a", 40, 0, 0), t("b", 40, 0, 40)],
      bucketBytes: 64,
      want: ["0:a[0,40)@0", "0:b[0,40)@0"],
    },
    {
      name: "splits a tensor larger than a bucket",
      tensors: [t("a", 8, 0, 0), t("big", 150, 0, 8), t("c", 8, 0, 158)],
      bucketBytes: 64,
      want: ["0:big[0,64)@0", "0:big[64,128)@0", "0:big[128,150)@0 a[0,8)@32 c[0,8)@48"],
    },
    {
      name: "fills buckets largest first, without cutting tensors that fit one",
      tensors: [t("a", 48, 0, 0), t("b", 32, 0, 48), t("c", 16, 0, 80), t("d", 32, 0, 96)],
      bucketBytes: 64,
      want: ["0:a[0,48)@0 c[0,16)@48", "0:b[0,32)@0 d[0,32)@32"],
    },
    {
      name: "never mixes owners: file f belongs to GPU f mod gpus",
      tensors: [t("a", 8, 0, 0), t("b", 8, 1, 0), t("c", 8, 2, 0), t("d", 8, 3, 0)],
      bucketBytes: 64,
      gpus: 2,
      want: ["0:a[0,8)@0 c[0,8)@16", "1:b[0,8)@0 d[0,8)@16"],
    },
    {
      name: "interleaves the owners' buckets so every GPU copies at once",
      tensors: [t("a", 40, 0, 0), t("b", 40, 0, 40), t("c", 40, 2, 0), t("d", 40, 1, 0)],
      bucketBytes: 64,
      gpus: 2,
      want: ["0:a[0,40)@0", "1:d[0,40)@0", "0:b[0,40)@0", "1:c[0,40)@0"],
    },
    {
      name: "moves an owner's excess to the others, cutting a tensor at the share",
      tensors: [t("big", 96, 0, 0), t("small", 32, 1, 0)],
      bucketBytes: 64,
      gpus: 2,
      want: ["0:big[0,64)@0", "1:small[0,32)@0 big[64,96)@32"],
    },
    {
      name: "cuts a tensor only at a multiple of the alignment from its start",
      tensors: [t("a", 40, 0, 0), t("b", 8, 1, 0)],
      bucketBytes: 64,
      gpus: 2,
      want: ["0:a[0,32)@0", "1:b[0,8)@0 a[32,40)@16"],
    },
    {
      name: "orders by file and offset, whatever the input order",
      tensors: [t("second", 8, 0, 8), t("first", 8, 0, 0)],
      bucketBytes: 64,
      want: ["0:first[0,8)@0 second[0,8)@16"],
    },
    {
      name: "gives what the alignment leaves over to the owner with the fewest bytes",
      tensors: [t("x", 5, 0, 0), t("a", 81, 0, 5), t("b", 2, 1, 0)],
      bucketBytes: 64,
      gpus: 2,
      want: ["0:a[0,32)@0 x[0,5)@32", "1:a[32,64)@0 a[64,81)@32", "1:b[0,2)@0"],
    },
    {
      name: "gives what the alignment leaves over to the first of the owners tied for the fewest bytes",
      tensors: [t("x", 5, 0, 0), t("a", 81, 0, 5), t("b", 2, 1, 0), t("d", 2, 2, 0)],
      bucketBytes: 64,
      gpus: 3,
      want: ["0:a[0,16)@0 x[0,5)@16", "1:a[48,81)@0 a[16,32)@48", "2:a[32,48)@0 d[0,2)@16", "1:b[0,2)@0"],
    },
    {
      name: "fills an owner under its share with as much of the excess as fits, in order",
      tensors: [t("a", 100, 0, 0), t("c", 20, 3, 0), t("b", 8, 1, 0), t("d", 40, 2, 0)],
      bucketBytes: 64,
      gpus: 3,
      want: ["0:a[0,64)@0", "1:a[64,100)@0 b[0,8)@48", "2:d[0,40)@0", "1:c[0,20)@0"],
    },
    {
      name: "packs pieces of the same size in the order of their bytes in the file",
      tensors: [t("x", 22, 0, 0), t("big", 150, 0, 40)],
      bucketBytes: 64,
      want: ["0:big[0,64)@0", "0:big[64,128)@0", "0:x[0,22)@0 big[128,150)@32"],
    },
    { name: "plans nothing for no tensors", tensors: [], bucketBytes: 64, want: [] },
    {
      name: "keeps empty tensors",
      tensors: [t("empty", 0, 0, 0), t("a", 8, 0, 0)],
      bucketBytes: 64,
      want: ["0:a[0,8)@0 empty[0,0)@16"],
    },
  ])("$name", ({ tensors, bucketBytes, gpus, want }) => {
    expect(view(tensors, bucketBytes, gpus)).toEqual(want);
  });

  it("covers every byte of every tensor exactly once, within bucket bounds, pieces apart", () => {
    // Seeded cases: sizes from 0 to over two buckets, 1 to 4 owners, three alignments, both orders.
    let seed = 12345;
    const rand = (n: number) => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return seed % n;
    };
    for (let c = 0; c < 200; c++) {
      const align = [1, 16, 256][c % 3] as number;
      const bucketBytes = align * (4 + rand(8));
      const owners = Array.from({ length: 1 + (c % 4) }, (_, i) => i);
      const files = 1 + rand(5);
      const offsets = new Array<number>(files).fill(0);
      const tensors = Array.from({ length: 1 + rand(40) }, (_, i) => {
        const bytes = rand(5) === 0 ? 0 : 1 + rand(bucketBytes * 2 + 7);
        const file = rand(files);
        const x = t(`t${i}`, bytes, file, offsets[file] as number);
        offsets[file] = (offsets[file] as number) + bytes;
        return x;
      });
      const order = c % 2 === 0 ? "size" : "layers";
      const buckets = planBuckets(tensors, { bucketBytes, owners, slots: owners.length * 2, align, order });
      const ranges = new Map<string, [number, number][]>();
      for (const b of buckets) {
        expect(b.bytes).toBeLessThanOrEqual(bucketBytes);
        const inSlot = b.pieces
          .map((p) => [p.slotOffset, p.slotOffset + p.range[1] - p.range[0]])
          .sort((x, y) => (x[0] as number) - (y[0] as number));
        for (const [k, [at, end]] of inSlot.entries()) {
          expect((at as number) % align).toBe(0);
          expect(end as number).toBeLessThanOrEqual(b.bytes);
          if (k > 0) expect(at as number).toBeGreaterThanOrEqual((inSlot[k - 1] as number[])[1] as number); // no overlap
        }
        expect(b.slot % owners.length).toBe(owners.indexOf(b.owner));
        for (const p of b.pieces) ranges.set(p.name, [...(ranges.get(p.name) ?? []), p.range]);
      }
      for (const x of tensors) {
        if (x.bytes === 0) continue; // nothing to move
        const got = (ranges.get(x.name) ?? []).sort((a, b) => a[0] - b[0]);
        let at = 0;
        for (const [begin, end] of got) {
          expect(begin).toBe(at); // contiguous: no gap, no overlap
          at = end;
        }
        expect(at, `case ${c}, ${x.name}`).toBe(x.bytes);
      }
    }
  });

  it("shares the bytes out evenly between owners, to within owners x align", () => {
    const tensors = Array.from({ length: 50 }, (_, i) => t(`t${i}`, ((i * 7919) % 300) + 1, i % 3, i * 1000));
    const buckets = planBuckets(tensors, { bucketBytes: 128, owners: [0, 1], slots: 4, align: 16 });
    const load = [0, 1].map((o) =>
      buckets
        .filter((b) => b.owner === o)
        .flatMap((b) => b.pieces)
        .reduce((sum, p) => sum + p.range[1] - p.range[0], 0),
    );
    expect(Math.abs((load[0] as number) - (load[1] as number))).toBeLessThanOrEqual(2 * 16); // owners x align
  });

  it("plans checkpoints of very many tensors in few files", () => {
    const tensors = Array.from({ length: 300_000 }, (_, i) => t(`t${i}`, 16, 0, i * 16));
    const buckets = planBuckets(tensors, { bucketBytes: 1 << 20, owners: [0, 1], slots: 4, align: 16 });
    expect(buckets.reduce((n, b) => n + b.pieces.length, 0)).toBe(300_000);
  });

  it("keeps each owner's own files when they are even", () => {
    const tensors = [0, 1, 2, 3].map((i) => t(`t${i}`, 48, i % 2, Math.floor(i / 2) * 48));
    for (const b of planBuckets(tensors, { bucketBytes: 64, owners: [0, 1], slots: 2, align: 16 })) {
      for (const p of b.pieces) expect(p.file % 2).toBe(b.owner);
    }
  });

  it("rejects a bucket size that is not a multiple of the alignment", () => {
    expect(() => planBuckets([], { bucketBytes: 100, owners: [0], slots: 2, align: 64 })).toThrow(/multiple of 64/);
  });

  it("gives each owner its own slots, in turn, with global ranks as owners", () => {
    const tensors = [0, 1, 2, 3, 4, 5].map((i) => t(`t${i}`, 64, i % 2, i * 64));
    const buckets = planBuckets(tensors, { bucketBytes: 64, owners: [3, 5], slots: 4, align: 16 });
    expect(buckets.map((b) => [b.owner, b.slot])).toEqual([
      [3, 0],
      [5, 1],
      [3, 2],
      [5, 3],
      [3, 0],
      [5, 1],
    ]);
    expect(() => planBuckets(tensors, { bucketBytes: 64, owners: [0, 1, 2], slots: 2 })).toThrow(
      /2 slots cannot serve 3/,
    );
  });

  it("plans the same whatever the order the tensors are listed in", () => {
    const tensors = [t("a", 64, 0, 0), t("b", 64, 0, 64), t("c", 64, 2, 0), t("d", 8, 1, 0)];
    const orders = (xs: PlanTensor[]): PlanTensor[][] =>
      xs.length <= 1 ? [xs] : xs.flatMap((x, i) => orders(xs.filter((_, k) => k !== i)).map((o) => [x, ...o]));
    // Each owner keeps the first bytes of its files, by file and offset: a, then b's first part.
    const want = ["0:a[0,64)@0", "1:c[0,64)@0", "0:b[0,48)@0", "1:b[48,64)@0 d[0,8)@16"];
    for (const order of orders(tensors)) expect(view(order, 64, 2)).toEqual(want);
  });

  it("puts a tensor into the first bucket with room, however many are open", () => {
    // 1000 buckets of 48 bytes (16 left each): the first 16-byte tensor fills bucket 0, the
    // second goes to bucket 1, the first with room, though 998 more have some.
    const fill = Array.from({ length: 1000 }, (_, i) => t(`f${i}`, 48, 0, i * 48));
    const smalls = [t("s1", 16, 0, 48_000), t("s2", 16, 0, 48_016)];
    const buckets = planBuckets([...fill, ...smalls], { bucketBytes: 64, owners: [0], slots: 2, align: 16 });
    expect(buckets).toHaveLength(1000);
    const where = (name: string) => buckets.findIndex((b) => b.pieces.some((p) => p.name === name));
    expect([where("s1"), where("s2")]).toEqual([0, 1]);
    expect(buckets.every((b) => b.bytes <= 64)).toBe(true);
  });

  it.each([
    { name: "a bucket of exactly the alignment", bucketBytes: 16, want: [16, 16] },
    { name: "buckets of a multiple of it", bucketBytes: 32, want: [32] },
  ])("accepts $name", ({ bucketBytes, want }) => {
    const planned = planBuckets([t("a", 32)], { bucketBytes, owners: [0], slots: 2, align: 16 });
    expect(planned.map((b) => b.bytes)).toEqual(want);
  });

  it.each([
    { bucketBytes: 0, message: "bucketBytes 0 must be a positive multiple of 16" },
    { bucketBytes: 8, message: "bucketBytes 8 must be a positive multiple of 16" },
    { bucketBytes: 24, message: "bucketBytes 24 must be a positive multiple of 16" },
    { bucketBytes: Number.NaN, message: "bucketBytes NaN must be a positive multiple of 16" },
  ])("rejects bucketBytes $bucketBytes", ({ bucketBytes, message }) => {
    expect(() => planBuckets([], { bucketBytes, owners: [0], slots: 2, align: 16 })).toThrow(new RangeError(message));
  });

  it("rejects a plan without owners, and accepts as many slots as owners", () => {
    expect(() => planBuckets([], { bucketBytes: 64, owners: [], slots: 2 })).toThrow(
      new RangeError("2 slots cannot serve 0 owners"),
    );
    const planned = planBuckets([t("a", 8, 0), t("b", 8, 1)], { bucketBytes: 256, owners: [0, 1], slots: 2 });
    expect(planned.map((b) => [b.owner, b.slot])).toEqual([
      [0, 0],
      [1, 1],
    ]);
  });

  it("locates each piece in its file: the tensor's offset plus where the piece begins", () => {
    const planned = planBuckets([t("a", 8, 0, 0), t("big", 150, 0, 8)], {
      bucketBytes: 64,
      owners: [0],
      slots: 2,
      align: 16,
    });
    const pieces = planned.flatMap((b) => b.pieces).map((p) => [p.name, p.range[0], p.fileOffset]);
    expect(pieces).toEqual([
      ["big", 0, 8],
      ["big", 64, 72],
      ["big", 128, 136],
      ["a", 0, 0],
    ]);
  });
});

describe("planBuckets in layer order", () => {
  const layered = (tensors: PlanTensor[], bucketBytes: number) =>
    planBuckets(tensors, { bucketBytes, owners: [0], slots: 2, align: 16, order: "layers" }).map((b) =>
      b.pieces.map((p) => `${p.name}[${p.range[0]},${p.range[1]})@${p.slotOffset}`).join(" "),
    );

  it("packs by layer number (not by name: layers.10 after layers.2), then name, never largest first", () => {
    const tensors = [
      t("model.layers.10.mlp.w", 40, 0, 0),
      t("model.layers.2.attn.w", 8, 0, 40),
      t("model.layers.2.mlp.w", 48, 0, 48),
      t("model.embed.w", 16, 0, 96),
      t("model.layers.10.attn.w", 8, 0, 112),
    ];
    expect(layered(tensors, 64)).toEqual([
      "model.embed.w[0,16)@0 model.layers.2.attn.w[0,8)@16",
      "model.layers.2.mlp.w[0,48)@0 model.layers.10.attn.w[0,8)@48",
      "model.layers.10.mlp.w[0,40)@0",
    ]);
  });

  it("cuts a tensor larger than a bucket into whole buckets, its remainder opening the next", () => {
    const tensors = [t("h.0.a", 8, 0, 0), t("h.0.big", 150, 0, 8), t("h.1.c", 8, 0, 158)];
    expect(layered(tensors, 64)).toEqual([
      "h.0.a[0,8)@0",
      "h.0.big[0,64)@0",
      "h.0.big[64,128)@0",
      "h.0.big[128,150)@0 h.1.c[0,8)@32",
    ]);
  });

  it("reads the layer number of the usual names", () => {
    expect(
      [
        "model.layers.12.mlp.up_proj.weight",
        "transformer.h.3.attn.c_attn.weight",
        "blocks.0.w",
        "lm_head.weight",
        "layers.x.w",
      ].map(layerOf),
    ).toEqual([12, 3, 0, -1, -1]);
  });
});

describe("the bucket size of a small update", () => {
  const opts = { bucketBytes: 256 << 20, owners: [0], slots: 4 };
  it("keeps the slots' size for a whole update, and shrinks for a small one, to whole chunks, 16 MiB at least", () => {
    expect(smallerBuckets(opts, 16e9).bucketBytes).toBe(256 << 20);
    expect(smallerBuckets(opts, 414e6).bucketBytes).toBe(Math.floor(414e6 / 8 / 65536) * 65536);
    expect(smallerBuckets(opts, 1e6).bucketBytes).toBe(16 << 20);
    expect(smallerBuckets({ ...opts, bucketBytes: 1 << 20 }, 1e6).bucketBytes).toBe(1 << 20);
  });
  it("paced: about 4 ms of the pace, whatever the update's size", () => {
    expect(smallerBuckets(opts, 16e9, 8).bucketBytes).toBe(Math.floor(32e6 / 65536) * 65536);
    expect(smallerBuckets(opts, 16e9, 1).bucketBytes).toBe(16 << 20);
  });
});
