#!/usr/bin/env node
/** Entry point under Node (`node --import tsx daemon/main.ts`) and Deno. */
import { fail, main } from "./cli.ts";

main(process.argv.slice(2), process.env).catch((err) => fail(String(err?.stack ?? err), 1));
