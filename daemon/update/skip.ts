/**
 * Which tensors an update may leave out: those every receiver it goes to already holds with
 * the same bytes (by hash). Buckets reach every GPU of an update, so a tensor is left out
 * only when no receiver lacks it; a receiver that holds nothing known, or asks for whole
 * updates, gets everything.
 */
import type { TensorRecord } from "../checkpoints/registry.ts";
import type { Holding } from "./receivers.ts";

type Held = Pick<TensorRecord, "name" | "hash" | "dtype" | "shape">;

/** What a receiver must hold of a tensor for it to be left out: its bytes, dtype and shape. */
export function heldAs(t: Held): string {
  return `${t.hash} ${t.dtype} ${t.shape.join("x")}`;
}

export interface Holder {
  partial: boolean;
  holds?: Holding;
}

/** The names of `tensors` that every holder holds with the same hash; empty when there is none. */
export function heldByAll(tensors: Held[], holders: Holder[]): Set<string> {
  const held = new Set<string>();
  if (holders.length === 0 || holders.some((h) => !h.partial || !h.holds)) return held;
  for (const t of tensors) {
    const want = heldAs(t);
    if (holders.every((h) => h.holds?.hashes.get(t.name) === want)) held.add(t.name);
  }
  return held;
}
