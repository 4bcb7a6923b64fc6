import { getRuntimeKey } from "hono/adapter";
import type { Runtime } from "./types.ts";

export type { Runtime, Server } from "./types.ts";

/** The adapter for the runtime this process runs on. */
export async function currentRuntime(): Promise<Runtime> {
  if (getRuntimeKey() === "deno") return (await import("./deno.ts")).denoRuntime;
  return (await import("./node.ts")).nodeRuntime;
}
