"""Plain LoRA as a variant (Hu et al. 2021, eq. 3): the layer's output plus ``B(A(dropout(x))) * s``; merging adds
``s * B @ A`` to the base weight. The base class of every variant (lorakit.adapters.variants: the registry): a
variant overrides the steps it changes.
"""

from __future__ import annotations

from torch import Tensor, nn

from lorakit.fast import branch

LoraLayer = nn.Module  # in annotations: a lorakit.adapters.layer.LoraLayer (which imports this module)


class Lora:
    """Plain LoRA: no parameters beyond A and B."""

    name = "lora"
    title = "LoRA"  # as messages name it
    runs_on = "every module kind"  # for messages: the kinds whose ``variants_supported`` name it
    plain = True  # its forward is base + s * B(A(dropout(x))): the layers' single-adapter fast path applies

    def check(self, module: nn.Module, r: int) -> None:
        """Called by inject for each target ``module`` (a LoRA layer already, or the module to wrap) before anything
        is wrapped: raise if this variant cannot adapt it with rank ``r``. Plain LoRA takes every target."""

    def create(self, layer: LoraLayer, adapter: str) -> None:
        """Called once A and B are initialized: nothing more to make."""

    def parameters(self, layer: LoraLayer, adapter: str) -> list[nn.Parameter]:
        return []

    def delete(self, layer: LoraLayer, adapter: str) -> None:
        pass

    def adapters_changed(self, layer: LoraLayer, adapter: str, changed: str) -> None:
        """Called by the layer for each of its adapters' variants once adapter ``changed`` was added to it or
        deleted from it (``adapter``: this variant's own adapter). Plain LoRA does not care; an Arrow router routes
        over the layer's other adapters (lorakit.adapters.variant_arrow)."""

    def frozen(self, layer: LoraLayer, adapter: str) -> list[nn.Parameter]:
        """The adapter's parameters that never train (MiCA's B); LoraLayer.trainable_parameters leaves them out."""
        return []

    def factors(self, layer: LoraLayer, adapter: str) -> tuple[Tensor, Tensor]:
        """(A (r, in), B (out, r)) whose ``s * B @ A`` is the adapter's update (the merge, mixed batches): its factors
        themselves; KaSA's are (A, B @ diag(d))."""
        return layer.lora_weights(adapter)

    def linear_forward(self, layer: LoraLayer, adapter: str, x: Tensor, base: Tensor, result: Tensor) -> Tensor:
        """``result + B(A(dropout(x))) * s``, computed by fast.branch.lora_add (equal to that composition, tested);
        plus ``b * s`` for an adapter with a bias on B (lora_bias)."""
        A, B = layer.lora_weights(adapter)
        out = branch.lora_add(result, x, A, B, layer.scaling[adapter], layer.lora_dropout[adapter])
        b = layer.lora_bias_of(adapter)
        return out if b is None else out + (b * layer.scaling[adapter]).to(out.dtype)

    def conv_forward(self, layer: LoraLayer, adapter: str, x: Tensor, base: Tensor, result: Tensor) -> Tensor:
        """A conv's ``result + B(A(dropout(x))) * s`` (lora_A, lora_B convs: lorakit.adapters.conv)."""
        A, B = layer.lora_A[adapter], layer.lora_B[adapter]
        lora = B(A(layer.lora_dropout[adapter](x.to(A.weight.dtype)))) * layer.scaling[adapter]  # (N, out, *S')
        return result + lora.to(result.dtype)

    def embedding_output(self, layer: LoraLayer, adapter: str, embedded: Tensor, lora: Tensor) -> Tensor:
        """What an embedding adds to its base output E[x]: the LoRA term ``s * A.T[x] @ B.T`` itself."""
        return lora

    def scale_args(self, layer: LoraLayer, adapter: str, weight: Tensor) -> tuple[Tensor, Tensor] | None:
        """No row scale: the mixed-batch path adds the LoRA term as it is."""
        return None

    def merged(self, layer: LoraLayer, adapter: str, weight: Tensor) -> Tensor:
        """``weight`` (storage layout) + s * B @ A."""
        return weight + layer.delta_weight(adapter)

    def unmerged(self, layer: LoraLayer, adapter: str, weight: Tensor) -> Tensor:
        """``weight`` (storage layout) - s * B @ A."""
        return weight - layer.delta_weight(adapter)

    def merged_out_in(self, layer: LoraLayer, adapter: str, weight: Tensor, base: Tensor, delta: Tensor) -> Tensor:
        """``weight`` (out, in) + ``delta`` (s * B @ A): the merge into a new full-precision weight."""
        return weight + delta
