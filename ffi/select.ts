import { existsSync } from "node:fs";
import { join } from "node:path";
import { type Backend, type Context, type ContextOptions, Library } from "./ckpt.ts";

export type BackendChoice = "auto" | Backend;

export interface OpenedBackend {
  context: Context;
  /** Why this backend was chosen, for the log. */
  reason: string;
}

/** Where the shared object of a backend lives in a library directory. */
export function libraryPath(dir: string, backend: Backend): string {
  return join(dir, `libckpt-${backend}.so`);
}

async function open(dir: string, backend: Backend, options: ContextOptions): Promise<Context> {
  const path = libraryPath(dir, backend);
  if (!existsSync(path)) throw new Error(`${path} does not exist (build it with: bash build.sh)`);
  return new Library(path).createContext(options);
}

/**
 * Opens the chosen backend. "auto" takes CUDA when its library loads and sees a GPU, and
 * falls back to the host backend otherwise; "cuda" fails unless a GPU is usable.
 */
export async function openBackend(
  choice: BackendChoice,
  dir: string,
  options: ContextOptions = {},
): Promise<OpenedBackend> {
  if (choice === "host") return { context: await open(dir, "host", options), reason: "configured" };
  let why: string;
  try {
    const context = await open(dir, "cuda", options);
    const count = context.deviceCount();
    if (count > 0) return { context, reason: `${count} GPU(s) visible` };
    await context.destroy();
    why = "no GPU visible";
  } catch (err) {
    why = `CUDA backend unavailable: ${(err as Error).message}`;
  }
  if (choice === "cuda") throw new Error(`backend "cuda" was requested but ${why}`);
  return { context: await open(dir, "host", options), reason: why };
}
