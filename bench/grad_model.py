"""A transformers model whose parameters require grad receives an update bit-exact.

    PYTHONPATH=. python3 bench/grad_model.py --url http://127.0.0.1:8470 --socket STATE/sockets/gpu-0.sock --tokens STATE/tokens

Builds a small Qwen3 from a config (offline, bf16, on cuda:0; its parameters require grad, as
any model built with plain torch does), pushes other weights of the same shapes to the daemon
through /dev/shm (`push_shm`), receives the update into `dict(model.named_parameters())` with
`apply_to_params`, and checks every parameter bit for bit, that it still requires grad, and
that a backward pass still runs. Prints one JSON line; exits 1 on any mismatch.
"""
import argparse
import json
import sys
import threading
import urllib.request

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from integrations.ckptd_receiver import Receiver, apply_to_params
from integrations.trainer_push import push_shm, token_from


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--tokens", help="the daemon's tokens file (default: its default one)")
    args = ap.parse_args()
    token = token_from(args.tokens)
    torch.manual_seed(0)
    config = Qwen3Config(hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                         vocab_size=32000, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(config).to(device="cuda:0", dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    new = {n: torch.randn(p.shape, dtype=torch.float32).to(torch.bfloat16) for n, p in params.items()}
    push_shm(args.url, "grad-model", new, token=token)

    receiver = Receiver(args.socket, device="cuda:0", name="grad-model", timeout=60)
    summary: dict = {}
    errors: list[BaseException] = []

    def receive() -> None:
        try:
            summary.update(receiver.receive(apply_to_params(params)))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=receive)
    t.start()
    req = urllib.request.Request(f"{args.url}/v1/updates", data=json.dumps({"checkpoint": "grad-model"}).encode(),
                                 headers={"content-type": "application/json", "authorization": f"Bearer {token}"},
                                 method="POST")
    with urllib.request.urlopen(req) as res:
        update = json.load(res)
    t.join()
    receiver.close()
    torch.cuda.synchronize()
    mismatched = [n for n, p in params.items()
                  if not torch.equal(p.detach().view(torch.int16).cpu(), new[n].view(torch.int16))]
    grad = all(p.requires_grad for p in params.values())
    loss = model(torch.randint(0, config.vocab_size, (1, 16), device="cuda:0")).logits.float().mean()
    loss.backward()
    backward = all(p.grad is not None for p in params.values() if p.requires_grad)
    ok = not errors and not mismatched and grad and backward and update.get("state") == "succeeded"
    print(json.dumps({"ok": ok, "params": len(params), "mismatched": mismatched[:10],
                      "requires_grad": grad, "backward": backward, "update": update.get("state"),
                      "error": repr(errors[0]) if errors else None,
                      "bytes": summary.get("bytes"), "tensors": summary.get("tensors")}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
