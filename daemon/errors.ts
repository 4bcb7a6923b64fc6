/**
 * Errors of the daemon's domain: a machine-readable code, a message for people and optional
 * details. Domain code knows no HTTP; `daemon/http/errors.ts` maps each code to a status.
 */
export const ERROR_CODES = [
  "invalid_request",
  "invalid_name",
  "invalid_ref",
  "invalid_source",
  "invalid_safetensors",
  "malformed_body",
  "incomplete",
  "wrong_size",
  "unauthorized",
  "forbidden",
  "forbidden_path",
  "not_found",
  "busy",
  "cancelled",
  "comm_lost",
  "in_use",
  "no_receivers",
  "not_held",
  "not_ready",
  "stale",
  "update_running",
  "body_too_large",
  "unsupported_media_type",
  "over_budget",
  "upload_dir_full",
  "registration_failed",
  "update_failed",
  "receiver_failed",
  "peer_unreachable",
  "bad_answer",
  "no_source",
  "pull_failed",
  "push_failed",
  "ucx_unavailable",
  "data_plane",
  "internal",
] as const;

export type ErrorCode = (typeof ERROR_CODES)[number];

/** A failure the API reports as it is: the code says what kind, the message what happened. */
export class DaemonError extends Error {
  constructor(
    readonly code: ErrorCode,
    message: string,
    readonly details?: unknown,
  ) {
    super(message);
    this.name = "DaemonError";
  }
}

/**
 * A value that came from outside (a header, a protocol message), for an error message: JSON,
 * at most 100 characters, whatever its depth or shape; never throws.
 */
export function preview(value: unknown): string {
  let text: string;
  try {
    text = JSON.stringify(value) ?? String(value);
  } catch {
    text = Array.isArray(value) ? "[... nested too deeply to print]" : typeof value;
  }
  return text.length > 100 ? `${text.slice(0, 100)}...` : text;
}
