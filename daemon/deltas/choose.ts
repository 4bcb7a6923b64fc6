/**
 * Which changed tensors an update may send as deltas: those for which a delta exists between
 * what every receiver holds and the target's tensor. Buckets reach every GPU, so one delta
 * goes to all: a delta sets the changed elements to their new values, so a receiver that
 * already holds the target's tensor is left as it is, and "every receiver holds one end of
 * it" is enough. A version's own delta takes its base forward; a later version's delta whose
 * base is the target takes that version back (a rollback). Pure.
 */
import type { HostMemory } from "../../ffi/index.ts";
import type { TensorRecord } from "../checkpoints/registry.ts";
import type { PlanTensor } from "../update/plan.ts";
import type { Holding } from "../update/receivers.ts";
import { heldAs } from "../update/skip.ts";
import { span, type TensorDelta, type VersionDelta } from "./derive.ts";

export interface DeltaHolder {
  partial: boolean;
  /** It applies deltas (hello `deltas: true`). */
  deltas: boolean;
  holds?: Holding;
}

/** A delta chosen for a tensor: its source (whose memory holds it) and the way it is read. */
export interface Chosen {
  source: VersionDelta;
  delta: TensorDelta;
  back: boolean;
}

type Target = Pick<TensorRecord, "name" | "hash" | "dtype" | "shape">;

/**
 * For each tensor of `target` but those in `skip`: a delta every holder can apply. `own` is
 * the target's delta (forward), `later` the deltas of versions whose base is the target (back).
 */
export function chooseDeltas(
  target: Target[],
  holders: DeltaHolder[],
  own: VersionDelta | undefined,
  later: VersionDelta[],
  skip: ReadonlySet<string> = new Set(),
): Map<string, Chosen> {
  const out = new Map<string, Chosen>();
  if (holders.length === 0 || holders.some((h) => !h.partial || !h.deltas || !h.holds)) return out;
  const held = (name: string) => holders.map((h) => h.holds?.hashes.get(name));
  for (const t of target) {
    if (skip.has(t.name)) continue;
    const want = heldAs(t);
    const have = held(t.name);
    const fits = (end: string) => have.every((h) => h === end || h === want);
    const forward = own?.tensors.get(t.name);
    if (own && forward && forward.to === want && fits(forward.from)) {
      out.set(t.name, { source: own, delta: forward, back: false });
      continue;
    }
    for (const v of later) {
      const d = v.tensors.get(t.name);
      if (d && d.from === want && fits(d.to)) {
        out.set(t.name, { source: v, delta: d, back: true });
        break;
      }
    }
  }
  return out;
}

/** What the planner gets for the chosen deltas: items to pack, and the memory they lie in. */
export interface DeltaItems {
  /** One per tensor sent as a delta: its span's bytes, in the source file past the version's files. */
  items: PlanTensor[];
  /** Each delta source's memory: an item's `file` minus the version's file count indexes it. */
  sources: HostMemory[];
  /** The tensors' whole size, which their deltas replace. */
  wholeBytes: number;
}

/** Plan items for the chosen deltas of `version`'s tensors. Pure. */
export function deltaItems(
  version: { files: readonly unknown[]; tensors: TensorRecord[] },
  chosen: Map<string, Chosen>,
): DeltaItems {
  const sources: HostMemory[] = [];
  const index = new Map<VersionDelta, number>();
  const items: PlanTensor[] = [];
  let wholeBytes = 0;
  for (const t of version.tensors) {
    const c = chosen.get(t.name);
    if (!c) continue;
    let file = index.get(c.source);
    if (file === undefined) {
      file = version.files.length + sources.length;
      sources.push(c.source.mem);
      index.set(c.source, file);
    }
    const s = span(c.delta, c.back);
    items.push({
      name: t.name,
      dtype: t.dtype,
      shape: t.shape,
      bytes: s.bytes,
      file,
      offset: s.offset,
      delta: { count: c.delta.count, positions: s.positions, values: s.values },
    });
    wholeBytes += t.bytes;
  }
  // The planner takes items in (file, offset) order without sorting them.
  items.sort((a, b) => a.file - b.file || a.offset - b.offset);
  return { items, sources, wholeBytes };
}
