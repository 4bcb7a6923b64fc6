export { CkptError } from "./errors.ts";
export { viewMemory } from "./library.ts";
export {
  type Backend,
  Context,
  type ContextOptions,
  DeviceBuffer,
  type DeviceInfoRecord,
  Event,
  HostMemory,
  type IpcHandleRecord,
  Library,
  Stream,
} from "./ckpt.ts";
export { libraryPath, openBackend, type BackendChoice, type OpenedBackend } from "./select.ts";
