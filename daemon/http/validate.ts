import * as v from "valibot";
import { DaemonError } from "../errors.ts";

/** Validates a decoded body against a schema; a 400 names the field and the problem. */
export function parseBody<S extends v.GenericSchema>(schema: S, body: unknown): v.InferOutput<S> {
  const result = v.safeParse(schema, body);
  if (result.success) return result.output;
  const issue = result.issues[0];
  const path = issue.path?.map((p) => String(p.key)).join(".") ?? "";
  throw new DaemonError("invalid_request", `${path ? `${path}: ` : ""}${issue.message}`, {
    issues: result.issues.map((i) => ({ path: i.path?.map((p) => String(p.key)).join("."), message: i.message })),
  });
}
