/**
 * Registered files changing underneath the daemon: truncated, replaced or rewritten after
 * registration, the version turns stale and updates from it are refused naming the file; a
 * file truncated while an update copies from it fails that update (a guarded bus error in the
 * data plane), and the daemon keeps serving.
 */
import { execFileSync } from "node:child_process";
import { readdirSync, readFileSync, renameSync, statSync, truncateSync, utimesSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { type Config, defaults } from "../daemon/config/index.ts";
import type { Daemon } from "../daemon/daemon.ts";
import { ckptHash, writeModel, writeSafetensors } from "./checkpoint-files.ts";
import { AUTH, daemonCommand, type RuntimeName, startProcess, tempDir, testCredentials } from "./helpers.ts";
import { apiOf, startInProcess } from "./in-process.ts";
import { type Behaviour, ReferenceReceiver } from "./reference-receiver.ts";

const cleanup: (() => Promise<void>)[] = [];

afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f();
});

async function start() {
  const stateDir = tempDir();
  const config: Config = {
    ...defaults({}),
    port: 0,
    backend: "host",
    hostDevices: 2,
    stateDir,
    uploadDir: tempDir("ckptd-test-", "/dev/shm"),
    registerRoots: ["/dev/shm"],
    ioThreads: 2,
    bucketBytes: 1 << 20,
    bucketSlots: 2,
    receiverTimeoutMs: 2000,
    ...testCredentials(),
  };
  const daemon: Daemon = await startInProcess(config);
  cleanup.push(() => daemon.stop());
  const api = apiOf(daemon.port);
  const receivers = async (behaviour: Behaviour = {}) => {
    const rs = [0, 1].map((g) => new ReferenceReceiver(`${stateDir}/sockets/gpu-${g}.sock`, `engine-${g}`, behaviour));
    for (const r of rs) {
      await r.connect();
      cleanup.push(() => r.close());
    }
    return rs;
  };
  return { api, receivers };
}

/** A model on tmpfs (pinned in place) whose tensors span several 1 MiB buckets; its file paths. */
async function register(api: Awaited<ReturnType<typeof start>>["api"], name: string, copy = false) {
  const dir = tempDir("ckptd-test-", "/dev/shm");
  const tensors = writeModel(dir, 2, 3, 512);
  tensors.push(...writeSafetensors(`${dir}/big.safetensors`, [{ name: "big", dtype: "F32", shape: [1400, 1024] }]));
  const res = await api("POST", "/v1/checkpoints", { name, dir, copy });
  expect(res.status).toBe(201);
  const files = readdirSync(dir).map((f) => join(dir, f));
  return { tensors, files, big: join(dir, "big.safetensors") };
}

/** The version's summary as GET /v1/checkpoints lists it. */
async function listed(api: Awaited<ReturnType<typeof start>>["api"], id: string) {
  const all = (await api("GET", "/v1/checkpoints")).body.checkpoints as { id: string; state: string }[];
  return all.find((v) => v.id === id);
}

describe("registered files changing underneath", () => {
  it("refuses an update from a truncated file with a 409 naming it, lists the version stale, keeps serving", async () => {
    const { api, receivers } = await start();
    const { big } = await register(api, "m");
    await receivers();
    expect((await api("POST", "/v1/updates", { checkpoint: "m" })).body.state).toBe("succeeded");

    truncateSync(big, 4096);
    const refused = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(refused.status).toBe(409);
    expect(refused.body.error.code).toBe("stale");
    expect(refused.body.error.message).toContain(big);
    expect(refused.body.error.message).toContain("was truncated to 4096 bytes");
    expect(refused.body.error.details).toMatchObject({ file: big });
    expect(await listed(api, "m@1")).toMatchObject({
      state: "stale",
      error: { code: "stale", details: { file: big } },
    });
    // Asked again (by name or number) it stays refused; no older version is picked instead.
    expect((await api("POST", "/v1/updates", { checkpoint: "m@1" })).body.error.code).toBe("stale");
    expect((await api("POST", "/v1/updates", { checkpoint: "m" })).status).toBe(409);

    expect((await api("GET", "/v1/healthz")).body).toEqual({ ok: true });
    await register(api, "n");
    expect((await api("POST", "/v1/updates", { checkpoint: "n" })).body.state).toBe("succeeded");
    // A stale version can be deleted like any other.
    expect((await api("DELETE", "/v1/checkpoints/m@1")).status).toBe(200);
  });

  it("marks the version stale as soon as inotify reports the change, before any update", async () => {
    const { api } = await start();
    const { big } = await register(api, "m");
    expect((await listed(api, "m@1"))?.state).toBe("ready");
    truncateSync(big, 4096);
    const until = Date.now() + 2000;
    while ((await listed(api, "m@1"))?.state !== "stale" && Date.now() < until)
      await new Promise((r) => setTimeout(r, 10));
    expect(await listed(api, "m@1")).toMatchObject({ state: "stale", error: { details: { file: big } } });
  });

  it("notices a file replaced by another of the same size and modification time (a new inode)", async () => {
    const { api, receivers } = await start();
    const { files } = await register(api, "m");
    await receivers();
    const victim = files[0] as string;
    const st = statSync(victim);
    writeFileSync(`${victim}.new`, readFileSync(victim));
    utimesSync(`${victim}.new`, st.atime, st.mtime);
    renameSync(`${victim}.new`, victim);
    const refused = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(refused.status).toBe(409);
    expect(refused.body.error.message).toContain(`${victim} was replaced by another file`);
    expect((await listed(api, "m@1"))?.state).toBe("stale");
  });

  it("does not delete the file that replaced an adopted one when the stale version is dropped", async () => {
    const { api } = await start();
    const dir = tempDir("ckptd-test-", "/dev/shm");
    const path = join(dir, "policy.safetensors");
    writeSafetensors(path, [{ name: "w", dtype: "F32", shape: [64, 64] }]);
    expect((await api("POST", "/v1/checkpoints", { name: "p", files: [path], adopt: true })).status).toBe(201);
    writeSafetensors(`${path}.next`, [{ name: "w", dtype: "F32", shape: [64, 64] }]);
    renameSync(`${path}.next`, path); // the trainer's next step, under the same name
    expect((await api("POST", "/v1/updates", { checkpoint: "p" })).body.error.code).toBe("stale");
    expect((await api("DELETE", "/v1/checkpoints/p")).status).toBe(200);
    expect(statSync(path).size).toBeGreaterThan(0); // the new file is the trainer's, not the daemon's
  });

  it("notices bytes rewritten in place with write(2) (same size, new modification time)", async () => {
    const { api, receivers } = await start();
    const { big } = await register(api, "m");
    await receivers();
    const bytes = readFileSync(big);
    bytes[bytes.length - 1] = (bytes[bytes.length - 1] as number) ^ 0xff;
    await new Promise((r) => setTimeout(r, 5));
    writeFileSync(big, bytes); // O_TRUNC, then the same length: the same inode, a new mtime
    const refused = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(refused.status).toBe(409);
    expect(refused.body.error.message).toMatch(new RegExp(`${big} (was modified at|was truncated)`));
  });

  it("notices bytes rewritten with write(2) whose modification time is put back (by the change time)", async () => {
    const { api, receivers } = await start();
    const { big } = await register(api, "m");
    await receivers();
    const before = statSync(big);
    const times = `${big}.times`;
    execFileSync("touch", ["-r", big, times]); // keeps its times to the nanosecond
    const bytes = readFileSync(big);
    bytes[bytes.length - 1] = (bytes[bytes.length - 1] as number) ^ 0xff;
    await new Promise((r) => setTimeout(r, 5));
    writeFileSync(big, bytes);
    execFileSync("touch", ["-r", times, big]); // as rsync -t or touch -r would
    expect(statSync(big).mtimeMs).toBe(before.mtimeMs);
    const refused = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(refused.status).toBe(409);
    expect(refused.body.error.message).toContain(`${big} was changed at`);
    expect(refused.body.error.message).toContain("written with its modification time put back");
  });

  it("leaves a version copied into pinned memory usable: its bytes no longer depend on the file", async () => {
    const { api, receivers } = await start();
    const { big, tensors } = await register(api, "m", true);
    const [r0] = await receivers();
    truncateSync(big, 0);
    const res = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.body.state).toBe("succeeded");
    const got = r0?.hashes.get(res.body.id);
    for (const t of tensors) expect(got?.get(t.name)).toBe(await ckptHash(t.bytes));
  });

  it("fails an update whose file is rewritten with write(2) while it copies: the engines get abort, not end", async () => {
    const { api, receivers } = await start();
    const { big } = await register(api, "m");
    const bytes = readFileSync(big);
    let rewrote = false;
    const rs = await receivers({
      beforeAck: () => {
        if (rewrote) return;
        rewrote = true;
        bytes[bytes.length - 1] = (bytes[bytes.length - 1] as number) ^ 1;
        writeFileSync(big, bytes); // same size, same inode, a new modification time
      },
    });
    const res = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(res.status).toBe(502);
    expect(res.body.error.message).toMatch(new RegExp(`^${big} was modified at .* while the update copied it$`));
    expect(res.body.error.details.receivers.map((r: { state: string }) => r.state)).not.toContain("applied");
    for (const r of rs) expect(r.seen.some((m) => m.op === "abort")).toBe(true);
    expect((await listed(api, "m@1"))?.state).toBe("stale");
  });

  it("fails an update whose file is truncated while it copies (a guarded bus error), naming the file", async () => {
    const { api, receivers } = await start();
    const { files } = await register(api, "m");
    // Passes the check before the update; truncated once the first bucket is acked, so the copies
    // issued after that read pages the files no longer have.
    let cut = false;
    await receivers({
      beforeAck: () => {
        if (cut) return;
        cut = true;
        for (const f of files) truncateSync(f, 8);
      },
    });
    const res = await api("POST", "/v1/updates", { checkpoint: "m" });
    expect(cut).toBe(true);
    expect(res.status).toBe(502);
    expect(res.body.error.details.state).toBe("failed");
    const message: string = res.body.error.message;
    expect(message).toMatch(/was truncated under its mapping while an update copied it \(bus error at byte \d+\)$/);
    expect(files.some((f) => message.startsWith(`${f} `))).toBe(true);
    expect((await listed(api, "m@1"))?.state).toBe("stale");
    // The daemon lives on, and its next update (of a fresh registration) works.
    expect((await api("GET", "/v1/healthz")).body).toEqual({ ok: true });
    cut = true;
    await register(api, "n");
    expect((await api("POST", "/v1/updates", { checkpoint: "n" })).body.state).toBe("succeeded");
  });
});

describe.each(["node", "deno"] as RuntimeName[])("a daemon process under %s", (runtime) => {
  it("marks a truncated file's version stale (inotify), refuses its update with a 409, and keeps serving", async () => {
    const daemon = await startProcess(daemonCommand(runtime));
    try {
      const call = async (method: string, path: string, body?: unknown) => {
        const headers = body ? { ...AUTH, "content-type": "application/json" } : AUTH;
        const res = await fetch(daemon.url + path, { method, headers, body: body ? JSON.stringify(body) : undefined });
        // biome-ignore lint/suspicious/noExplicitAny: checked field by field
        return { status: res.status, body: (await res.json()) as any };
      };
      const dir = tempDir("ckptd-test-", "/dev/shm");
      writeModel(dir);
      expect((await call("POST", "/v1/checkpoints", { name: "m", dir })).status).toBe(201);
      const victim = join(dir, "model-1-of-2.safetensors");
      truncateSync(victim, 16);
      const state = async () => (await call("GET", "/v1/checkpoints")).body.checkpoints[0]?.state;
      const until = Date.now() + 3000;
      while ((await state()) !== "stale" && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
      expect(await state()).toBe("stale");
      const refused = await call("POST", "/v1/updates", { checkpoint: "m" });
      expect(refused.status).toBe(409);
      expect(refused.body.error).toMatchObject({ code: "stale", details: { file: victim } });
      expect((await call("GET", "/v1/healthz")).body).toEqual({ ok: true });
    } finally {
      daemon.proc.kill("SIGTERM");
      expect(await daemon.exited).toBe(0);
    }
  });
});
