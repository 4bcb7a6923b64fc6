/** What every answer of the API must look like: below 500, and errors in the one shape with their status. */
import { decode } from "cbor-x";
import { ERROR_CODES, type ErrorCode } from "../../daemon/errors.ts";
import { httpStatus } from "../../daemon/http/errors.ts";
import type { Answer } from "./daemon.ts";

/** The decoded body of an answer (JSON or CBOR, by its content type); throws when it is neither. */
export function bodyOf(a: Answer): unknown {
  const type = String(a.headers["content-type"] ?? "");
  if (type.startsWith("application/cbor")) return decode(a.body);
  return JSON.parse(a.body.toString("utf8"));
}

/** Why an answer is wrong (a 5xx, a body that is not the error shape, a status unlike its code), or undefined. */
export function wrongAnswer(a: Answer, allow5xx: readonly string[] = []): string | undefined {
  let body: unknown;
  try {
    body = bodyOf(a);
  } catch (err) {
    return `${a.status} with an undecodable body (${(err as Error).message}): ${a.body.subarray(0, 200).toString()}`;
  }
  if (a.status < 400) return a.status >= 200 && a.status < 300 ? undefined : `status ${a.status}`;
  const error = (body as { error?: { code?: unknown; message?: unknown } } | null)?.error;
  if (typeof error?.code !== "string" || typeof error.message !== "string") {
    return `${a.status} without the error shape: ${a.body.subarray(0, 200).toString()}`;
  }
  if (!(ERROR_CODES as readonly string[]).includes(error.code)) return `${a.status} with an unknown code ${error.code}`;
  if (httpStatus(error.code as ErrorCode) !== a.status) return `${a.status} with code ${error.code}`;
  if (a.status >= 500 && !allow5xx.includes(error.code))
    return `${a.status} ${error.code}: ${error.message.slice(0, 300)}`;
  return undefined;
}

/** The error code of an answer, or undefined. */
export function codeOf(a: Answer): string | undefined {
  try {
    return (bodyOf(a) as { error?: { code?: string } }).error?.code;
  } catch {
    return undefined;
  }
}
