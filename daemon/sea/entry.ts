/** Entry of the single binary: extract the native parts, then run the daemon. */
import { fail, main } from "../cli.ts";
import { extractNative } from "./extract.ts";

(globalThis as { ckptdLibDir?: string }).ckptdLibDir = extractNative();
main(process.argv.slice(2), process.env).catch((err) => fail(String(err?.stack ?? err), 1));
