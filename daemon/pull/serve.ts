/**
 * The source side of a pull: a ready version's pinned files exposed over UCX (once, on the
 * first manifest asked of it; until it is dropped), and the manifest that says how to fetch
 * and check them. Serving takes no GPU and no per-byte JavaScript: the progress thread of
 * the library sends straight from the pinned memory.
 */

import type { Context, Exposed } from "../../ffi/index.ts";
import type { CheckpointVersion, Registry } from "../checkpoints/registry.ts";
import { span, type VersionDelta } from "../deltas/derive.ts";
import { DaemonError } from "../errors.ts";
import { fingerprint, withFingerprint } from "../update/fingerprint.ts";
import type { Manifest } from "./manifest.ts";
import { gapsOf } from "./stripe.ts";
import type { PullTransport } from "./transport.ts";

interface Served {
  /** Per file, its region on each lane. */
  regions: Exposed[][];
  gaps: Manifest["gaps"];
  /** Its deltas' memory on each lane, once they exist and a manifest was asked for after. */
  deltas?: Promise<Exposed[]>;
}

export interface SourceDeps {
  nodeId: string;
  ctx: Context;
  registry: Registry;
  transport: PullTransport;
  threads: number;
}

const hex = (b: Uint8Array) => Buffer.from(b).toString("hex");

/** An exposed region as a manifest names it. */
const regionOf = (r: Exposed) => ({ id: r.id.toString(), key: hex(r.key) });

export class PullSource {
  private readonly served = new Map<CheckpointVersion, Promise<Served>>();

  constructor(private readonly deps: SourceDeps) {
    deps.registry.beforeDrop((v) => this.forget(v));
  }

  /** The manifest of the ready version `name` with fingerprint `fp`; 404 when this daemon has none. */
  async manifest(name: string, fp: string): Promise<Manifest> {
    const v = withFingerprint(this.deps.registry.list(), name, fp);
    if (!v || v.deleting) {
      throw new DaemonError("not_found", `no ready version of "${name}" with fingerprint ${fp.slice(0, 16)} here`);
    }
    let served = this.served.get(v);
    if (!served) {
      served = this.serve(v);
      this.served.set(v, served);
      served.catch(() => this.served.delete(v));
    }
    const s = await served;
    const { regions, gaps } = s;
    const delta = v.delta;
    if (delta && !s.deltas) {
      s.deltas = this.deps.transport.expose(delta.mem);
      s.deltas.catch(() => {
        s.deltas = undefined;
      });
    }
    const deltaRegions = delta && (await s.deltas?.catch(() => undefined));
    return {
      nodeId: this.deps.nodeId,
      name: v.name,
      version: v.version,
      fingerprint: fingerprint(v),
      addresses: await this.deps.transport.addresses(),
      files: v.files.map((f, i) => ({
        size: f.size,
        regions: (regions[i] ?? []).map(regionOf),
      })),
      tensors: v.tensors,
      gaps,
      ...(delta && deltaRegions ? { deltas: deltasOf(delta, deltaRegions) } : {}),
    };
  }

  /** Exposes every file of v and hashes the bytes between its tensors. */
  private async serve(v: CheckpointVersion): Promise<Served> {
    const spans = v.files.flatMap((f, file) =>
      gapsOf(
        f.size,
        v.tensors.filter((t) => t.file === file).map((t) => ({ begin: t.offset, end: t.offset + t.bytes })),
      ).map(([begin, end]) => ({ file, begin, end })),
    );
    const ranges = new BigUint64Array(spans.length * 2);
    spans.forEach((s, k) => {
      ranges[2 * k] = (v.pinned[s.file]?.mem.address ?? 0n) + BigInt(s.begin);
      ranges[2 * k + 1] = BigInt(s.end - s.begin);
    });
    const hashes = await this.deps.ctx.hash(ranges, this.deps.threads);
    const gaps = spans.map((s, k) => ({ ...s, hash: (hashes[k] as bigint).toString(16).padStart(16, "0") }));
    const regions: Exposed[][] = [];
    try {
      for (const p of v.pinned) regions.push(await this.deps.transport.expose(p.mem));
    } catch (err) {
      for (const r of regions) await this.deps.transport.unexpose(r);
      throw err;
    }
    return { regions, gaps };
  }

  /** Stops serving v (before its memory is released). */
  async forget(v: CheckpointVersion): Promise<void> {
    const served = this.served.get(v);
    if (!served) return;
    this.served.delete(v);
    const s = await served.catch(() => undefined);
    for (const r of s?.regions ?? []) await this.deps.transport.unexpose(r);
    const deltas = await s?.deltas?.catch(() => undefined);
    if (deltas) await this.deps.transport.unexpose(deltas);
  }
}

/** The manifest's part of a version's deltas: each forward span, where the puller finds it. */
function deltasOf(delta: VersionDelta, regions: Exposed[]): NonNullable<Manifest["deltas"]> {
  return {
    regions: regions.map(regionOf),
    tensors: [...delta.tensors.values()].map((d) => {
      const s = span(d, false);
      return {
        name: d.name,
        from: d.baseHash,
        count: d.count,
        offset: s.offset,
        bytes: s.bytes,
        positions: s.positions,
        values: s.values,
      };
    }),
  };
}
