import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { tempDir, thrown } from "../../test/helpers.ts";
import { checkWeightMap, INDEX_FILE, resolveDirectory, resolveFiles } from "./sources.ts";

/** A directory holding `files` (name -> contents). */
function dirWith(files: Record<string, string>): string {
  const dir = tempDir();
  for (const [name, text] of Object.entries(files)) writeFileSync(join(dir, name), text);
  return dir;
}

function indexOf(weightMap: unknown): string {
  return JSON.stringify({ metadata: { total_size: 0 }, weight_map: weightMap });
}

describe("resolveDirectory without an index", () => {
  it("takes every *.safetensors file, sorted, and nothing else", () => {
    const dir = dirWith({ "b.safetensors": "", "a.safetensors": "", "config.json": "{}", "c.safetensors.tmp": "" });
    expect(resolveDirectory(dir)).toEqual({ files: [join(dir, "a.safetensors"), join(dir, "b.safetensors")] });
  });

  it("refuses a directory with neither an index nor a safetensors file", () => {
    const dir = dirWith({ "config.json": "{}", safetensors: "" });
    const err = thrown(() => resolveDirectory(dir));
    expect(err.code).toBe("invalid_source");
    expect(err.message).toBe(`${dir}: no ${INDEX_FILE} and no *.safetensors files`);
  });

  it("refuses a relative path", () => {
    const err = thrown(() => resolveDirectory("models/m"));
    expect(err.code).toBe("invalid_source");
    expect(err.message).toBe('dir must be an absolute path, not "models/m"');
  });

  it("says why a directory cannot be listed", () => {
    const missing = join(tempDir(), "gone");
    const err = thrown(() => resolveDirectory(missing));
    expect(err.code).toBe("invalid_source");
    expect(err.message).toMatch(new RegExp(`^${missing}: cannot list the directory: ENOENT`));
  });
});

describe("resolveDirectory with an index", () => {
  it("takes the index's files, each once and sorted, with the tensor map", () => {
    const dir = dirWith({
      [INDEX_FILE]: indexOf({ w1: "z.safetensors", w2: "a.safetensors", w3: "z.safetensors" }),
      "a.safetensors": "",
      "z.safetensors": "",
      "unlisted.safetensors": "",
    });
    const { files, weightMap } = resolveDirectory(dir);
    expect(files).toEqual([join(dir, "a.safetensors"), join(dir, "z.safetensors")]);
    expect(weightMap).toEqual(
      new Map([
        ["w1", join(dir, "z.safetensors")],
        ["w2", join(dir, "a.safetensors")],
        ["w3", join(dir, "z.safetensors")],
      ]),
    );
  });

  it.each([
    ["text that is not JSON", "{weight_map:", "not valid JSON"],
    ["JSON null", "null", 'no "weight_map" object'],
    ["no weight_map", JSON.stringify({ metadata: {} }), 'no "weight_map" object'],
    ["a weight_map that is null", JSON.stringify({ weight_map: null }), 'no "weight_map" object'],
    ["a weight_map that is a string", JSON.stringify({ weight_map: "a.safetensors" }), 'no "weight_map" object'],
    ["a weight_map that is an array", JSON.stringify({ weight_map: ["a.safetensors"] }), 'no "weight_map" object'],
    ["an empty weight_map", indexOf({}), "weight_map is empty"],
    ["a file that is a number", indexOf({ w: 3 }), 'weight_map["w"] is not a file name in the directory'],
    [
      "a file in another directory",
      indexOf({ w: "../a.safetensors" }),
      'weight_map["w"] is not a file name in the directory',
    ],
    ["an empty file name", indexOf({ w: "" }), 'weight_map["w"] is not a file name in the directory'],
  ])("refuses %s", (_case, text, message) => {
    const dir = dirWith({ [INDEX_FILE]: text, "a.safetensors": "" });
    const err = thrown(() => resolveDirectory(dir));
    expect(err.code).toBe("invalid_source");
    expect(err.message).toBe(`${join(dir, INDEX_FILE)}: ${message}`);
  });

  it("refuses an index that names a missing file", () => {
    const dir = dirWith({ [INDEX_FILE]: indexOf({ w: "a.safetensors", v: "b.safetensors" }), "a.safetensors": "" });
    const err = thrown(() => resolveDirectory(dir));
    expect(err.code).toBe("invalid_source");
    expect(err.message).toBe(`${join(dir, "b.safetensors")}: no such file`);
  });

  it("refuses an index that names a directory", () => {
    const dir = dirWith({ [INDEX_FILE]: indexOf({ w: "sub.safetensors" }) });
    mkdirSync(join(dir, "sub.safetensors"));
    const err = thrown(() => resolveDirectory(dir));
    expect(err.code).toBe("invalid_source");
    expect(err.message).toBe(`${join(dir, "sub.safetensors")}: not a regular file`);
  });
});

describe("resolveFiles", () => {
  it("takes absolute paths in the order given, normalised", () => {
    const dir = dirWith({ "b.safetensors": "", "a.safetensors": "" });
    expect(resolveFiles([join(dir, "b.safetensors"), `${dir}/./a.safetensors`])).toEqual({
      files: [join(dir, "b.safetensors"), join(dir, "a.safetensors")],
    });
  });

  it("refuses an empty list", () => {
    const err = thrown(() => resolveFiles([]));
    expect(err.code).toBe("invalid_source");
    expect(err.message).toBe("files is empty");
  });

  it("refuses a relative path", () => {
    const err = thrown(() => resolveFiles(["a.safetensors"]));
    expect(err.code).toBe("invalid_source");
    expect(err.message).toBe('files must be absolute paths, not "a.safetensors"');
  });

  it("refuses a file listed twice, also under another spelling", () => {
    const dir = dirWith({ "a.safetensors": "" });
    const again = `${dir}/sub/../a.safetensors`;
    const err = thrown(() => resolveFiles([join(dir, "a.safetensors"), again]));
    expect(err.code).toBe("invalid_source");
    expect(err.message).toBe(`${again} is listed twice`);
  });

  it("refuses a directory", () => {
    const dir = tempDir();
    const err = thrown(() => resolveFiles([dir]));
    expect(err.code).toBe("invalid_source");
    expect(err.message).toBe(`${dir}: not a regular file`);
  });

  it("says no such file for a missing one, and the system's reason otherwise", () => {
    const dir = dirWith({ "a.safetensors": "" });
    const missing = join(dir, "b.safetensors");
    expect(thrown(() => resolveFiles([missing])).message).toBe(`${missing}: no such file`);
    // A path through a regular file fails with ENOTDIR, not ENOENT.
    const through = join(dir, "a.safetensors", "x.safetensors");
    const err = thrown(() => resolveFiles([through]));
    expect(err.code).toBe("invalid_source");
    expect(err.message).toMatch(new RegExp(`^${through}: ENOTDIR`));
  });
});

describe("checkWeightMap", () => {
  const index = new Map([
    ["a", "/m/1.safetensors"],
    ["b", "/m/2.safetensors"],
  ]);

  it("accepts files that hold every listed tensor where listed, and more", () => {
    const found = new Map([...index, ["extra", "/m/1.safetensors"]]);
    expect(() => checkWeightMap(index, found)).not.toThrow();
  });

  it("names a tensor found in another file", () => {
    const err = thrown(() => checkWeightMap(index, new Map([...index, ["b", "/m/1.safetensors"]])));
    expect(err.code).toBe("invalid_source");
    expect(err.message).toBe(`${INDEX_FILE} puts "b" in /m/2.safetensors but it is in /m/1.safetensors`);
  });

  it("names a tensor no file holds", () => {
    const err = thrown(() => checkWeightMap(index, new Map([["a", "/m/1.safetensors"]])));
    expect(err.code).toBe("invalid_source");
    expect(err.message).toBe(`${INDEX_FILE} puts "b" in /m/2.safetensors but no file holds it`);
  });
});
