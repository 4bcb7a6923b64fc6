export {
  type Backend,
  Comm,
  Context,
  type ContextOptions,
  DeviceBuffer,
  type DeviceInfoRecord,
  Event,
  HostMemory,
  type IpcHandleRecord,
  Library,
  type PeerCred,
  Stream,
} from "./ckpt.ts";
export { CKPT_EFAULT } from "./constants.ts";
export { CkptError } from "./errors.ts";
export { viewMemory } from "./library.ts";
export { type BackendChoice, libraryPath, type OpenedBackend, openBackend } from "./select.ts";
