/** Error thrown when a libckpt call returns a negative status. */
export class CkptError extends Error {
  /** The negative ckpt_status, e.g. -8. */
  readonly code: number;
  /** The status name, e.g. "CKPT_ERANGE". */
  readonly status: string;
  /** The library's detail from ckpt_last_error (which call, which CUDA error or errno). */
  readonly detail: string;

  constructor(call: string, code: number, status: string, text: string, detail: string) {
    super(`${call}: ${status}: ${text}${detail ? ` (${detail})` : ""}`);
    this.name = "CkptError";
    this.code = code;
    this.status = status;
    this.detail = detail;
  }
}
