/** Resolves what a registration names (a directory or a list of files) into files. */
import { readdirSync, readFileSync, statSync } from "node:fs";
import { isAbsolute, join, resolve } from "node:path";
import { DaemonError } from "../errors.ts";

export const INDEX_FILE = "model.safetensors.index.json";

export interface ResolvedSource {
  files: string[];
  /** tensor name -> file, from the index, when the directory has one. */
  weightMap?: Map<string, string>;
}

function bad(message: string): never {
  throw new DaemonError("invalid_source", message);
}

function checkFile(path: string): void {
  let st: ReturnType<typeof statSync>;
  try {
    st = statSync(path);
  } catch (err) {
    bad(`${path}: ${(err as NodeJS.ErrnoException).code === "ENOENT" ? "no such file" : (err as Error).message}`);
  }
  if (!st.isFile()) bad(`${path}: not a regular file`);
}

/** A Hugging Face style directory: the index's files, or every *.safetensors file. */
export function resolveDirectory(dir: string): ResolvedSource {
  if (!isAbsolute(dir)) bad(`dir must be an absolute path, not "${dir}"`);
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch (err) {
    bad(`${dir}: cannot list the directory: ${(err as Error).message}`);
  }
  if (names.includes(INDEX_FILE)) {
    const path = join(dir, INDEX_FILE);
    let index: unknown;
    try {
      index = JSON.parse(readFileSync(path, "utf8"));
    } catch {
      // The parser's message quotes the file's text; the caller may not be allowed to read it.
      bad(`${path}: not valid JSON`);
    }
    const map = (index as { weight_map?: unknown })?.weight_map;
    if (typeof map !== "object" || map === null || Array.isArray(map)) bad(`${path}: no "weight_map" object`);
    const weightMap = new Map<string, string>();
    for (const [tensor, file] of Object.entries(map)) {
      if (typeof file !== "string" || file.includes("/") || !file) {
        bad(`${path}: weight_map["${tensor}"] is not a file name in the directory`);
      }
      weightMap.set(tensor, join(dir, file));
    }
    const files = [...new Set(weightMap.values())].sort();
    if (files.length === 0) bad(`${path}: weight_map is empty`);
    for (const file of files) checkFile(file);
    return { files, weightMap };
  }
  const files = names
    .filter((n) => n.endsWith(".safetensors"))
    .sort()
    .map((n) => join(dir, n));
  if (files.length === 0) bad(`${dir}: no ${INDEX_FILE} and no *.safetensors files`);
  return { files };
}

/** An explicit list of absolute .safetensors paths, each a regular file, none repeated. */
export function resolveFiles(files: string[]): ResolvedSource {
  if (files.length === 0) bad("files is empty");
  const seen = new Set<string>();
  for (const file of files) {
    if (!isAbsolute(file)) bad(`files must be absolute paths, not "${file}"`);
    const abs = resolve(file);
    if (seen.has(abs)) bad(`${file} is listed twice`);
    seen.add(abs);
    checkFile(abs);
  }
  return { files: [...seen] };
}

/** Checks the index against what the files hold: every listed tensor is where it says. */
export function checkWeightMap(weightMap: Map<string, string>, found: Map<string, string>): void {
  for (const [tensor, file] of weightMap) {
    const actual = found.get(tensor);
    if (actual !== file) {
      bad(`${INDEX_FILE} puts "${tensor}" in ${file} but ${actual ? `it is in ${actual}` : "no file holds it"}`);
    }
  }
}
