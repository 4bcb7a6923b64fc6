/**
 * Sharded pushes: a trainer of several processes (one per GPU, each holding part of the
 * tensors) pushes one version together. Each rank sends its part of a push it names (`id`,
 * with how many parts there are and which one it is); once every part is in, they are copied
 * at once, each as a file of the version, and every rank's request answers the same version.
 * A part that never comes within `waitMs` of the first fails the others, naming it, and
 * nothing is registered.
 */
import { DaemonError } from "../errors.ts";
import { type PushDeps, pushFromDevices } from "./device-push.ts";
import { type PushRequest, planPush } from "./push-plan.ts";
import type { CheckpointVersion } from "./registry.ts";

export interface PartOf {
  /** Names the sharded push: the same for every rank of it. */
  id: string;
  index: number;
  of: number;
  /** How long the parts wait for the others (ms; default 60 s). */
  waitMs?: number;
}

interface Gathering {
  name: string;
  of: number;
  parts: (PushRequest | undefined)[];
  waiting: { resolve: (v: CheckpointVersion) => void; reject: (err: unknown) => void }[];
  timer: ReturnType<typeof setTimeout>;
}

const DEFAULT_WAIT_MS = 60_000;

export class PushParts {
  private readonly gatherings = new Map<string, Gathering>();

  constructor(private readonly deps: PushDeps) {}

  /** Waits for every part of `part.id`, then pushes them as one version; answers it, or why not. */
  push(req: PushRequest, part: PartOf): Promise<CheckpointVersion> {
    if (part.index >= part.of) {
      throw new DaemonError("invalid_request", `part ${part.index} of ${part.of}: parts count from 0`);
    }
    planPush(req, this.deps.ctx.devices()); // a part that cannot be copied is refused alone, at once
    const key = `${req.name}\n${part.id}`;
    let g = this.gatherings.get(key);
    if (g && g.of !== part.of) {
      throw new DaemonError("invalid_request", `push ${part.id} has ${g.of} parts, not ${part.of}`);
    }
    if (g?.parts[part.index]) {
      throw new DaemonError("busy", `part ${part.index} of push ${part.id} of "${req.name}" was given already`);
    }
    if (!g) {
      const waitMs = part.waitMs ?? DEFAULT_WAIT_MS;
      const timer = setTimeout(() => this.expire(key, waitMs), waitMs);
      timer.unref?.(); // a push still gathering does not keep a stopping daemon alive
      g = { name: req.name, of: part.of, parts: new Array(part.of).fill(undefined), waiting: [], timer };
      this.gatherings.set(key, g);
    }
    const gathering = g;
    gathering.parts[part.index] = req;
    const answer = new Promise<CheckpointVersion>((resolve, reject) => gathering.waiting.push({ resolve, reject }));
    if (gathering.parts.every((p) => p)) this.start(key, gathering);
    return answer;
  }

  private start(key: string, g: Gathering): void {
    clearTimeout(g.timer);
    this.gatherings.delete(key);
    pushFromDevices(g.parts as PushRequest[], this.deps).then(
      (v) => {
        for (const w of g.waiting) w.resolve(v);
      },
      (err) => {
        for (const w of g.waiting) w.reject(err);
      },
    );
  }

  private expire(key: string, waitMs: number): void {
    const g = this.gatherings.get(key);
    if (!g) return;
    this.gatherings.delete(key);
    const missing = g.parts.flatMap((p, i) => (p ? [] : [i]));
    const id = key.split("\n")[1];
    const err = new DaemonError(
      "incomplete",
      `push ${id} of "${g.name}": part${missing.length > 1 ? "s" : ""} ${missing.join(", ")} of ${g.of} did not come within ${waitMs} ms; nothing was registered`,
      { missing },
    );
    for (const w of g.waiting) w.reject(err);
  }
}
