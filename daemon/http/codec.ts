/** JSON by default, CBOR when the request asks for it (Content-Type / Accept). */
import { decode, encode } from "cbor-x";
import type { Context } from "hono";
import type { ContentfulStatusCode } from "hono/utils/http-status";
import { DaemonError } from "../errors.ts";

export const CBOR = "application/cbor";
const JSON_RANGES = ["application/json", "application/*", "*/*"];

/**
 * True when the Accept header prefers CBOR to JSON: the higher q-value wins, a tie goes to the
 * one listed first. Wildcards stand for JSON, the default.
 */
export function wantsCbor(accept: string | undefined): boolean {
  let cbor = { q: 0, at: 0 };
  let json = { q: 0, at: 0 };
  (accept ?? "").split(",").forEach((part, at) => {
    const [range = "", ...params] = part.split(";").map((x) => x.trim().toLowerCase());
    const qParam = params.find((p) => p.startsWith("q="));
    const q = qParam === undefined ? 1 : Number(qParam.slice(2)) || 0;
    const pick = (seen: { q: number; at: number }) => (q > seen.q ? { q, at } : seen);
    if (range === CBOR) cbor = pick(cbor);
    else if (JSON_RANGES.includes(range)) json = pick(json);
  });
  return cbor.q > 0 && (cbor.q > json.q || (cbor.q === json.q && cbor.at < json.at));
}

/** Sends data as CBOR or JSON, as the request's Accept header asks. */
export function reply(c: Context, data: unknown, status: ContentfulStatusCode = 200): Response {
  if (wantsCbor(c.req.header("accept"))) {
    return c.body(new Uint8Array(encode(data)), status, { "content-type": CBOR });
  }
  return c.json(data, status);
}

/** The default of `maxBodyBytes`. */
export const MAX_BODY_BYTES = 16 << 20;

function tooLarge(limit: number, what: string): DaemonError {
  return new DaemonError("body_too_large", `request body ${what} the limit of ${limit} bytes (maxBodyBytes)`, {
    maxBodyBytes: limit,
  });
}

/**
 * Reads a body of at most `limit` bytes: a larger Content-Length is refused before reading, and
 * a chunked body is counted as it arrives and dropped at the first byte beyond the limit.
 */
export async function readLimited(c: Context, limit: number): Promise<Uint8Array> {
  const declared = Number(c.req.header("content-length") ?? Number.NaN);
  if (declared > limit) throw tooLarge(limit, `of ${declared} bytes exceeds`);
  const body = c.req.raw.body;
  if (!body) return new Uint8Array(0);
  const chunks: Uint8Array[] = [];
  let total = 0;
  const reader = body.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    total += value.byteLength;
    if (total > limit) {
      reader.releaseLock(); // not cancelled: see streamTo in checkpoints/uploads.ts
      throw tooLarge(limit, "exceeds");
    }
    chunks.push(value);
  }
  const bytes = new Uint8Array(total);
  let at = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, at);
    at += chunk.byteLength;
  }
  return bytes;
}

/**
 * Decodes a request body by its Content-Type; malformed or unsupported bodies are 400/415, one
 * over `limit` bytes a 413. An empty body is undefined: the route's schema says whether it needs one.
 */
export async function readBody(c: Context, limit = MAX_BODY_BYTES): Promise<unknown> {
  const type = (c.req.header("content-type") ?? "").split(";")[0]?.trim().toLowerCase() ?? "";
  const bytes = await readLimited(c, limit);
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
