import { existsSync, readdirSync, readFileSync, readlinkSync, statSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { AUTH, tempDir, testCredentials } from "../../test/helpers.ts";
import { apiOf, startInProcess } from "../../test/in-process.ts";
import { type Config, defaults } from "../config/index.ts";
import type { Daemon } from "../daemon.ts";
import type { DaemonError } from "../errors.ts";
import type { CheckpointVersion, RegisterRequest, Registry } from "./registry.ts";
import { parseHeader } from "./safetensors.ts";
import { Uploads } from "./uploads.ts";

/** A registry that admits everything and records what it was asked to register. */
function fakeRegistry(budget = Number.POSITIVE_INFINITY) {
  const registered: RegisterRequest[] = [];
  const registry = {
    checkBudget(bytes: number, what: string) {
      if (bytes > budget) throw new Error(`${what} ${bytes} bytes: over budget`);
    },
    budgetLeft: () => budget,
    register: async (req: RegisterRequest) => {
      registered.push(req);
      return { id: `${req.name}@1` } as CheckpointVersion;
    },
  } as unknown as Registry;
  return { registry, registered };
}

function uploadsIn(dir = tempDir(), budget?: number) {
  const { registry, registered } = fakeRegistry(budget);
  return { uploads: new Uploads(registry, dir), registered, dir };
}

/** A body sending `chunks` one read at a time, then failing with `error` if given. */
function body(chunks: Uint8Array[], error?: Error): ReadableStream<Uint8Array> {
  let next = 0;
  return new ReadableStream({
    pull(c) {
      const chunk = chunks[next++];
      if (chunk) c.enqueue(chunk);
      else if (error) c.error(error);
      else c.close();
    },
  });
}

/** A body that sends `chunk` once `release` is called (a request still arriving until then). */
function heldBody(chunk: Uint8Array) {
  let release = () => {};
  const released = new Promise<void>((resolve) => {
    release = resolve;
  });
  const stream = new ReadableStream<Uint8Array>({
    async pull(c) {
      await released;
      c.enqueue(chunk);
      c.close();
    },
  });
  return { stream, release };
}

const bytes = (...values: number[]) => new Uint8Array(values);

async function rejection(promise: Promise<unknown>): Promise<DaemonError> {
  try {
    await promise;
  } catch (err) {
    return err as DaemonError;
  }
  throw new Error("expected a rejection");
}

/** What each tensor of a committed safetensors file holds. */
function tensorsOf(path: string): Record<string, number[]> {
  const file = new Uint8Array(readFileSync(path));
  const h = parseHeader(file, file.byteLength, path);
  return Object.fromEntries(h.tensors.map((t) => [t.name, [...file.subarray(t.begin, t.end)]]));
}

/** Paths of the files this process holds open. */
function openFiles(): string[] {
  return readdirSync("/proc/self/fd").flatMap((fd) => {
    try {
      return [readlinkSync(`/proc/self/fd/${fd}`)];
    } catch {
      return [];
    }
  });
}

describe("Uploads tensors", () => {
  const decl = [
    { name: "a", dtype: "U8", shape: [4] },
    { name: "b", dtype: "U8", shape: [6] },
  ];

  it("puts bytes that arrive in several chunks each where its tensor lies", async () => {
    const { uploads, registered } = uploadsIn();
    const { id } = await uploads.create({ name: "m", tensors: decl });
    await uploads.putTensor(id, "b", body([bytes(10, 11), bytes(12, 13, 14), bytes(15)]));
    await uploads.putTensor(id, "a", body([bytes(1), bytes(2, 3, 4)]));
    await uploads.commit(id);
    const files = registered[0]?.source.files ?? [];
    expect(files).toHaveLength(1);
    expect(tensorsOf(files[0] as string)).toEqual({ a: [1, 2, 3, 4], b: [10, 11, 12, 13, 14, 15] });
  });

  it("refuses a tensor sent too long without writing past its place", async () => {
    const { uploads, registered } = uploadsIn();
    const { id } = await uploads.create({ name: "m", tensors: decl });
    await uploads.putTensor(id, "b", body([bytes(10, 11, 12, 13, 14, 15)]));
    const err = await rejection(uploads.putTensor(id, "a", body([bytes(1, 2, 3, 4, 5, 6)])));
    expect([err.code, err.message]).toEqual(["wrong_size", 'tensor "a" needs exactly 4 bytes, got more']);
    // The last tensor too: a longer body must not grow the file.
    expect((await rejection(uploads.putTensor(id, "b", body([bytes(1, 2, 3, 4), bytes(5, 6, 7)])))).message).toBe(
      'tensor "b" needs exactly 6 bytes, got more',
    );
    await uploads.putTensor(id, "a", body([bytes(1, 2, 3, 4)]));
    await uploads.putTensor(id, "b", body([bytes(10, 11, 12, 13, 14, 15)]));
    await uploads.commit(id);
    const path = registered[0]?.source.files[0] as string;
    expect(tensorsOf(path)).toEqual({ a: [1, 2, 3, 4], b: [10, 11, 12, 13, 14, 15] });
    const file = readFileSync(path);
    expect(file.byteLength).toBe(parseHeader(file, file.byteLength, path).dataStart + 10);
  });

  it("takes a request without a body as zero bytes", async () => {
    const { uploads } = uploadsIn();
    const { id } = await uploads.create({
      name: "m",
      tensors: [
        { name: "empty", dtype: "F32", shape: [0] },
        { name: "w", dtype: "U8", shape: [2] },
      ],
    });
    expect(await uploads.putTensor(id, "empty", null)).toEqual({ name: "empty", bytes: 0 });
    const err = await rejection(uploads.putTensor(id, "w", null));
    expect([err.code, err.message]).toEqual(["wrong_size", 'tensor "w" needs exactly 2 bytes, got 0']);
    expect(uploads.list()[0]?.tensors).toEqual([
      { name: "empty", bytes: 0, written: true },
      { name: "w", bytes: 2, written: false },
    ]);
  });

  it("counts a tensor unwritten again once a new body for it fails half-way", async () => {
    const { uploads } = uploadsIn();
    const { id } = await uploads.create({ name: "m", tensors: decl });
    await uploads.putTensor(id, "a", body([bytes(1, 2, 3, 4)]));
    expect(uploads.list()[0]?.tensors[0]).toEqual({ name: "a", bytes: 4, written: true });
    const broken = new Error("connection reset");
    expect(await rejection(uploads.putTensor(id, "a", body([bytes(9, 9)], broken)))).toBe(broken);
    expect(uploads.list()[0]?.tensors[0]).toEqual({ name: "a", bytes: 4, written: false });
    await uploads.putTensor(id, "b", body([bytes(1, 2, 3, 4, 5, 6)]));
    const err = await rejection(uploads.commit(id));
    expect([err.code, err.message]).toEqual(["incomplete", "tensors not uploaded yet: a"]);
  });

  it("closes the tensors file after every request, failed or not", async () => {
    const { uploads, dir } = uploadsIn();
    const { id } = await uploads.create({ name: "m", tensors: decl });
    await uploads.putTensor(id, "a", body([bytes(1, 2, 3, 4)]));
    await rejection(uploads.putTensor(id, "b", body([bytes(1)])));
    await rejection(uploads.putTensor(id, "b", body([bytes(1)], new Error("reset"))));
    expect(openFiles().filter((p) => p.startsWith(dir))).toEqual([]);
  });

  it("names the first ten missing tensors, and all of them in the details", async () => {
    const { uploads } = uploadsIn();
    const names = Array.from({ length: 12 }, (_, i) => `t${String(i).padStart(2, "0")}`);
    const { id } = await uploads.create({
      name: "m",
      tensors: names.map((name) => ({ name, dtype: "U8", shape: [1] })),
    });
    const err = await rejection(uploads.commit(id));
    expect(err.code).toBe("incomplete");
    expect(err.message).toBe(`tensors not uploaded yet: ${names.slice(0, 10).join(", ")}`);
    expect(err.details).toEqual({ missing: names });
  });
});

describe("Uploads files", () => {
  it("keeps nothing of a file whose body fails half-way", async () => {
    const { uploads, dir } = uploadsIn();
    const { id } = await uploads.create({ name: "m", tensors: [] });
    const broken = new Error("connection reset");
    expect(await rejection(uploads.putFile(id, "x.safetensors", body([bytes(1, 2, 3)], broken)))).toBe(broken);
    expect(readdirSync(dir)).toEqual([]);
    expect(uploads.list()).toEqual([{ id, name: "m", tensors: [], files: [] }]);
    expect(openFiles().filter((p) => p.startsWith(dir))).toEqual([]);
  });
});

describe("Uploads declarations", () => {
  it.each([
    [
      "a tensor of more than 2^53 - 1 bytes",
      [{ name: "w", dtype: "U8", shape: [2 ** 40, 2 ** 40] }],
      "shape [1099511627776,1099511627776] of U8 is 1208925819614629174706176 bytes, more than 2^53 - 1",
    ],
    [
      "tensors of more than 2^53 - 1 bytes together",
      [
        { name: "a", dtype: "U8", shape: [2 ** 52] },
        { name: "b", dtype: "U8", shape: [2 ** 52] },
      ],
      /^the upload is 9007199254741\d{3} bytes, more than 2\^53 - 1$/,
    ],
    [
      "a tensor declared twice",
      [
        { name: "w", dtype: "U8", shape: [1] },
        { name: "w", dtype: "U8", shape: [2] },
      ],
      'tensor "w" is declared twice',
    ],
    ["an odd count of F4", [{ name: "w", dtype: "F4", shape: [3, 1] }], "shape [3,1] of F4 is not whole bytes"],
  ])("refuses %s with a 400, staging nothing", async (_case, tensors, message) => {
    const { uploads, dir } = uploadsIn(join(tempDir(), "uploads"));
    const err = await rejection(uploads.create({ name: "m", tensors }));
    expect(err.code).toBe("invalid_request");
    if (typeof message === "string") expect(err.message).toBe(message);
    else expect(err.message).toMatch(message);
    expect(existsSync(dir)).toBe(false);
    expect(uploads.list()).toEqual([]);
  });

  it("takes exactly 2^53 - 1 bytes in one tensor as a number", async () => {
    const { uploads } = uploadsIn(join(tempDir(), "uploads"), 0);
    // Over the (fake) budget, so nothing is staged; the size is checked first.
    const err = await rejection(
      uploads.create({ name: "m", tensors: [{ name: "w", dtype: "U8", shape: [2 ** 53 - 1] }] }),
    );
    expect(err.message).toBe(`declaring tensors of ${2 ** 53 - 1} bytes: over budget`);
  });

  // ext4 holds files of up to 16 TiB; tmpfs takes a sparse one of any size (then nothing fails).
  const HUGE = 2 ** 45;
  const fsRefusesHuge = (() => {
    const probe = join(tempDir(), "probe");
    writeFileSync(probe, "");
    try {
      truncateSync(probe, HUGE);
      return false;
    } catch {
      return true;
    }
  })();

  it.skipIf(!fsRefusesHuge)("leaves no file behind when the tensors file cannot be laid out", async () => {
    const { uploads, dir } = uploadsIn();
    const err = await rejection(uploads.create({ name: "m", tensors: [{ name: "w", dtype: "U8", shape: [HUGE] }] }));
    expect((err as NodeJS.ErrnoException).code).toBe("EFBIG");
    expect(readdirSync(dir)).toEqual([]);
    expect(uploads.list()).toEqual([]);
  });

  it("refuses a bad name before anything else", async () => {
    const { uploads } = uploadsIn();
    expect(
      (await rejection(uploads.create({ name: "m@1", tensors: [{ name: "w", dtype: "U8", shape: [1] }] }))).code,
    ).toBe("invalid_name");
  });

  it("lays the declared tensors out back to back in one 0600 file after the header", async () => {
    const { uploads, dir } = uploadsIn();
    const created = await uploads.create({
      name: "m",
      tensors: [
        { name: "a", dtype: "F32", shape: [2, 3] },
        { name: "b", dtype: "BF16", shape: [5] },
      ],
      metadata: { format: "pt" },
    });
    expect(created).toEqual({
      id: created.id,
      name: "m",
      tensors: [
        { name: "a", bytes: 24, written: false },
        { name: "b", bytes: 10, written: false },
      ],
      files: [],
    });
    expect(created.id).toMatch(/^[0-9a-f]{16}$/);
    const path = join(dir, `${created.id}-tensors.safetensors`);
    expect(statSync(path).mode & 0o777).toBe(0o600);
    const file = new Uint8Array(readFileSync(path));
    const h = parseHeader(file, file.byteLength, path);
    expect(h.metadata).toEqual({ format: "pt" });
    expect(h.tensors.map((t) => [t.name, t.begin - h.dataStart, t.end - h.dataStart])).toEqual([
      ["a", 0, 24],
      ["b", 24, 34],
    ]);
    expect(file.byteLength).toBe(h.dataStart + 34);
  });
});

describe("Uploads files within the budget", () => {
  const file = (n: number) => new Uint8Array(n).fill(7);

  it("refuses a file declared larger than the budget leaves before reading it", async () => {
    const { uploads, dir } = uploadsIn(tempDir(), 100);
    const { id } = await uploads.create({ name: "m", tensors: [] });
    const err = await rejection(uploads.putFile(id, "a.safetensors", body([file(10)]), 101));
    expect([err.code, err.message, err.details]).toEqual([
      "body_too_large",
      'file "a.safetensors" exceeds the 100 bytes the pinned-memory budget leaves (pinnedBudgetBytes); nothing was kept',
      { limitBytes: 100 },
    ]);
    expect(readdirSync(dir)).toEqual([]);
  });

  it("stops a file that streams past the budget, and counts the upload's other files against it", async () => {
    const { uploads, dir } = uploadsIn(tempDir(), 100);
    const { id } = await uploads.create({ name: "m", tensors: [] });
    expect(await uploads.putFile(id, "a.safetensors", body([file(60)]), 60)).toEqual({
      file: "a.safetensors",
      bytes: 60,
    });
    const err = await rejection(uploads.putFile(id, "b.safetensors", body([file(30), file(11)])));
    expect([err.code, err.details]).toEqual(["body_too_large", { limitBytes: 40 }]);
    expect(readdirSync(dir)).toEqual([`${id}-a.safetensors`]);
    // Replacing a file counts the budget without the one it replaces.
    expect(await uploads.putFile(id, "a.safetensors", body([file(100)]))).toEqual({
      file: "a.safetensors",
      bytes: 100,
    });
    expect(statSync(join(dir, `${id}-a.safetensors`)).size).toBe(100);
    expect(await uploads.putFile(id, "c.safetensors", null)).toEqual({ file: "c.safetensors", bytes: 0 });
    expect(uploads.list()[0]?.files).toEqual(["a.safetensors", "c.safetensors"]);
  });

  it("refuses a file name that is not a plain .safetensors name", async () => {
    const { uploads } = uploadsIn();
    const { id } = await uploads.create({ name: "m", tensors: [] });
    for (const name of ["../x.safetensors", "x.bin", ".safetensors", "a/b.safetensors", "x.safetensors.tmp"]) {
      const err = await rejection(uploads.putFile(id, name, body([])));
      expect([err.code, err.message]).toEqual([
        "invalid_request",
        `file name "${name}" must be a plain name ending in .safetensors`,
      ]);
    }
  });

  it("commits the tensors file first, then the files, and forgets the upload", async () => {
    const { uploads, registered, dir } = uploadsIn();
    const { id } = await uploads.create({ name: "m", tensors: [{ name: "w", dtype: "U8", shape: [1] }] });
    await uploads.putTensor(id, "w", body([bytes(1)]));
    await uploads.putFile(id, "z.safetensors", body([bytes(1)]));
    await uploads.putFile(id, "b.safetensors", body([bytes(1)]));
    await uploads.commit(id);
    expect(registered).toEqual([
      {
        name: "m",
        source: { files: [`${id}-tensors`, `${id}-z`, `${id}-b`].map((n) => join(dir, `${n}.safetensors`)) },
        copy: false,
        adopt: true,
      },
    ]);
    expect((await rejection(uploads.commit(id))).message).toBe(`no upload ${id}`);
  });
});

describe("Uploads, the rest of the life of one", () => {
  it("makes a missing upload directory 0700", async () => {
    const { uploads, dir } = uploadsIn(join(tempDir(), "uploads"));
    await uploads.create({ name: "m", tensors: [{ name: "w", dtype: "U8", shape: [1] }] });
    expect(statSync(dir).mode & 0o777).toBe(0o700);
  });

  it("answers not_found for a tensor it does not declare, also in an upload of files only", async () => {
    const { uploads } = uploadsIn();
    const withTensors = (await uploads.create({ name: "m", tensors: [{ name: "w", dtype: "U8", shape: [1] }] })).id;
    const filesOnly = (await uploads.create({ name: "m", tensors: [] })).id;
    for (const id of [withTensors, filesOnly]) {
      const err = await rejection(uploads.putTensor(id, "v", body([bytes(1)])));
      expect([err.code, err.message]).toEqual(["not_found", `upload ${id} declares no tensor "v"`]);
    }
    expect((await rejection(uploads.putTensor("0000000000000000", "w", null))).message).toBe(
      "no upload 0000000000000000",
    );
  });

  it("takes a file of exactly what the budget leaves, declared or streamed", async () => {
    const { uploads } = uploadsIn(tempDir(), 100);
    const { id } = await uploads.create({ name: "m", tensors: [] });
    const file = new Uint8Array(50).fill(1);
    expect(await uploads.putFile(id, "a.safetensors", body([file]), 50)).toEqual({ file: "a.safetensors", bytes: 50 });
    expect(await uploads.putFile(id, "b.safetensors", body([file.subarray(0, 20), file.subarray(20)]))).toEqual({
      file: "b.safetensors",
      bytes: 50,
    });
    const err = await rejection(uploads.putFile(id, "c.safetensors", body([bytes(1)])));
    expect([err.code, err.details]).toEqual(["body_too_large", { limitBytes: 0 }]);
  });

  it("refuses to commit an upload holding nothing", async () => {
    const { uploads } = uploadsIn();
    const { id } = await uploads.create({ name: "m", tensors: [] });
    const err = await rejection(uploads.commit(id));
    expect([err.code, err.message]).toEqual(["incomplete", `upload ${id} holds no tensors or files`]);
  });

  it("keeps the upload when its registration fails, so it can be deleted with its files", async () => {
    const dir = tempDir();
    const failing = {
      checkBudget() {},
      budgetLeft: () => Number.POSITIVE_INFINITY,
      register: async () => {
        throw new Error("registration failed");
      },
    } as unknown as Registry;
    const uploads = new Uploads(failing, dir);
    const { id } = await uploads.create({ name: "m", tensors: [{ name: "w", dtype: "U8", shape: [1] }] });
    await uploads.putTensor(id, "w", body([bytes(1)]));
    await uploads.putFile(id, "f.safetensors", body([bytes(1)]));
    expect((await rejection(uploads.commit(id))).message).toBe("registration failed");
    expect(uploads.list().map((u) => u.id)).toEqual([id]);
    expect(readdirSync(dir).sort()).toEqual([`${id}-f.safetensors`, `${id}-tensors.safetensors`]);
    expect(await uploads.delete(id)).toBe(id);
    expect(readdirSync(dir)).toEqual([]);
    expect(uploads.list()).toEqual([]);
    expect((await rejection(uploads.delete(id))).code).toBe("not_found");
  });
});

describe("Uploads take one request at a time", () => {
  it("answers busy to every other request on an upload while one is in flight, and serves it after", async () => {
    const { uploads } = uploadsIn();
    const { id } = await uploads.create({ name: "m", tensors: [{ name: "w", dtype: "U8", shape: [2] }] });
    const held = heldBody(bytes(7, 8));
    const first = uploads.putTensor(id, "w", held.stream);
    const busy = [
      () => uploads.putTensor(id, "w", body([bytes(1, 2)])),
      () => uploads.putFile(id, "f.safetensors", body([bytes(1)])),
      () => uploads.commit(id),
      () => uploads.delete(id),
    ];
    for (const call of busy) {
      const err = await rejection(call());
      expect([err.code, err.message]).toEqual(["busy", `upload ${id} is busy with another request`]);
    }
    expect(uploads.list()).toHaveLength(1); // listing is not a request on the upload
    held.release();
    expect(await first).toEqual({ name: "w", bytes: 2 });
    expect((await uploads.commit(id)).id).toBe("m@1");
    expect(uploads.list()).toEqual([]);
  });
});

describe("upload routes", () => {
  let daemon: Daemon | undefined;
  afterEach(async () => {
    await daemon?.stop();
    daemon = undefined;
  });

  it("commits without waiting when asked, answering 202 and where the version is", async () => {
    const config: Config = {
      ...defaults({}),
      port: 0,
      backend: "host",
      stateDir: tempDir(),
      uploadDir: tempDir("ckptd-test-", "/dev/shm"),
      registerRoots: ["/dev/shm", tmpdir()],
      ioThreads: 1,
      ...testCredentials(),
    };
    daemon = await startInProcess(config);
    const api = apiOf(daemon.port);
    const put = (id: string, data: Uint8Array<ArrayBuffer>) =>
      fetch(`http://127.0.0.1:${daemon?.port}/v1/uploads/${id}/tensors/w`, {
        method: "PUT",
        headers: { ...AUTH, "content-type": "application/octet-stream" },
        body: data.slice(),
      });
    const commit = (id: string, wait?: boolean) =>
      fetch(`http://127.0.0.1:${daemon?.port}/v1/uploads/${id}/commit`, {
        method: "POST",
        headers: { ...AUTH, "content-type": "application/json" },
        body: wait === undefined ? undefined : JSON.stringify({ wait }),
      });

    const first = (await api("POST", "/v1/uploads", { name: "p", tensors: [{ name: "w", dtype: "U8", shape: [4] }] }))
      .body.id;
    expect((await put(first, bytes(1, 2, 3, 4))).status).toBe(200);
    const later = await commit(first, false);
    expect(later.status).toBe(202);
    expect(later.headers.get("location")).toBe("/v1/checkpoints/p@1");
    expect(((await later.json()) as { id: string }).id).toBe("p@1");
    await daemon.registry.get("p@1").finished();

    const second = (await api("POST", "/v1/uploads", { name: "p", tensors: [{ name: "w", dtype: "U8", shape: [4] }] }))
      .body.id;
    expect((await put(second, bytes(5, 6, 7, 8))).status).toBe(200);
    const waited = await commit(second);
    expect(waited.status).toBe(201);
    expect(waited.headers.get("location")).toBe("/v1/checkpoints/p@2");
    expect(await waited.json()).toMatchObject({ id: "p@2", state: "ready" });
  });
});
