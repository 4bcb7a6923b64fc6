export {
  type Backend,
  Comm,
  Context,
  type ContextOptions,
  DeviceBuffer,
  type DeviceInfoRecord,
  Event,
  type FoundDelta,
  HostMemory,
  type IpcHandleRecord,
  Library,
  type PeerCred,
  Stream,
} from "./ckpt.ts";
export {
  CKPT_EBUSY,
  CKPT_ECANCELED,
  CKPT_EFAULT,
  CKPT_EHANDLE,
  CKPT_ERANGE,
  CKPT_EUCX,
  CKPT_HASH_CHUNK,
  CKPT_IPC_CUDA,
  CKPT_IPC_HOST,
} from "./constants.ts";
export { CkptError } from "./errors.ts";
export { viewMemory } from "./library.ts";
export { type BackendChoice, libraryPath, type OpenedBackend, openBackend } from "./select.ts";
export { type Completion, type Exposed, Ucx, type UcxConfig, UcxPeer } from "./ucx.ts";
