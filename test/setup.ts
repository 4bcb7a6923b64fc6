/** Runs in every test file: what the tests made on disk goes when the file ends. */
import { afterAll } from "vitest";
import { removeTempDirs } from "./helpers.ts";

afterAll(removeTempDirs);
