import type { ContentfulStatusCode } from "hono/utils/http-status";
import { DaemonError, type ErrorCode } from "../errors.ts";

/** The one error shape of the API: `{error: {code, message, details?}}`. */
export interface ErrorBody {
  error: { code: string; message: string; details?: unknown };
}

/** The one place where a domain error's code becomes an HTTP status. */
const STATUS: Record<ErrorCode, ContentfulStatusCode> = {
  invalid_request: 400,
  invalid_name: 400,
  invalid_ref: 400,
  invalid_source: 400,
  invalid_safetensors: 400,
  malformed_body: 400,
  incomplete: 400,
  wrong_size: 400,
  unauthorized: 401,
  forbidden: 403,
  forbidden_path: 403,
  not_found: 404,
  busy: 409,
  cancelled: 409,
  comm_lost: 409,
  in_use: 409,
  no_receivers: 409,
  not_held: 409,
  not_ready: 409,
  stale: 409,
  update_running: 409,
  body_too_large: 413,
  unsupported_media_type: 415,
  over_budget: 507,
  upload_dir_full: 507,
  registration_failed: 500,
  update_failed: 502,
  receiver_failed: 502,
  peer_unreachable: 502,
  bad_answer: 502,
  no_source: 409,
  pull_failed: 502,
  push_failed: 422,
  ucx_unavailable: 503,
  data_plane: 500,
  internal: 500,
};

/** The HTTP status of an error code. */
export function httpStatus(code: ErrorCode): ContentfulStatusCode {
  return STATUS[code];
}

/** The body of an error answer. */
export function errorBody(err: DaemonError): ErrorBody {
  const error: ErrorBody["error"] = { code: err.code, message: err.message };
  if (err.details !== undefined) error.details = err.details;
  return { error };
}

export { DaemonError };
