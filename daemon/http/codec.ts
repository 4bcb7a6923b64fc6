/** JSON by default, CBOR when the request asks for it (Content-Type / Accept). */
import { decode, encode } from "cbor-x";
import type { Context } from "hono";
import type { ContentfulStatusCode } from "hono/utils/http-status";
import { DaemonError } from "../errors.ts";

export const CBOR = "application/cbor";

/** True when the client accepts CBOR and did not put JSON first. */
export function wantsCbor(accept: string | undefined): boolean {
  return (accept ?? "").split(",").some((part) => part.trim().split(";")[0]?.trim() === CBOR);
}

/** Sends data as CBOR or JSON, as the request's Accept header asks. */
export function reply(c: Context, data: unknown, status: ContentfulStatusCode = 200): Response {
  if (wantsCbor(c.req.header("accept"))) {
    return c.body(new Uint8Array(encode(data)), status, { "content-type": CBOR });
  }
  return c.json(data, status);
}

/**
 * Decodes a request body by its Content-Type; malformed or unsupported bodies are 400/415.
 * An empty body is undefined: the route's schema says whether it needs one.
 */
export async function readBody(c: Context): Promise<unknown> {
  const type = (c.req.header("content-type") ?? "").split(";")[0]?.trim().toLowerCase() ?? "";
  const bytes = new Uint8Array(await c.req.arrayBuffer());
  if (bytes.byteLength === 0) return undefined;
  if (type === CBOR) {
    try {
      return decode(bytes);
    } catch (err) {
      throw new DaemonError("malformed_body", `malformed CBOR body: ${(err as Error).message}`);
    }
  }
  if (type === "application/json" || type === "") {
    try {
      return JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
    } catch (err) {
      throw new DaemonError("malformed_body", `malformed JSON body: ${(err as Error).message}`);
    }
  }
  throw new DaemonError("unsupported_media_type", `bodies must be application/json or ${CBOR}, not ${type}`);
}
