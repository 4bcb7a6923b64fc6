"""ckptd in vLLM, two ways (neither imports vLLM until vLLM loads it):

- the weight transfer backend (`transfer.CkptdWeightTransferEngine`, registered by `plugin.register`
  as the `vllm.general_plugins` entry point of the installed distribution), for vLLM 0.25 and
  later: `--weight-transfer-config '{"backend": "ckptd"}'`, driven by vLLM's own RL routes;
- the worker extension (`extension.CkptdWorkerExtension`), for older vLLM or a server run without
  a weight transfer config: `--worker-extension-cls ckptd.vllm.extension.CkptdWorkerExtension`,
  driven through `/collective_rpc`.

Both load through `load.WeightLoad`: direct for unquantized models, vLLM's layerwise reload for
quantized and MLA ones. Written against vLLM's source up to v0.32 (paths in each module); not run
against a real vLLM.
"""
