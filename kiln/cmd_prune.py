"""`kiln compress prune`: unstructured / N:M (magnitude, wanda, sparsegpt), structured width and depth."""
from __future__ import annotations

import click

from .common import emit_json, stderr

METHODS = ("magnitude", "wanda", "sparsegpt", "width", "depth")


def _config(method, sparsity, pattern, mlp, kv_groups, layers):
    from compress.errors import CompressError
    from compress.prune import NM, Depth, Magnitude, SparseGPT, StructuredWidth, Wanda

    unstructured = {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT}
    if method in unstructured:
        if mlp is not None or kv_groups is not None or layers is not None:
            raise CompressError(f"--mlp/--kv-groups/--layers are for --method width/depth, not {method}")
        if (sparsity is None) == (pattern is None):
            raise CompressError(f"--method {method} needs exactly one of --sparsity FRACTION or --pattern N:M")
        return unstructured[method](sparsity=NM.parse(pattern) if pattern else sparsity)
    if sparsity is not None or pattern is not None:
        raise CompressError(f"--sparsity/--pattern are for magnitude/wanda/sparsegpt, not {method}")
    if method == "width":
        if layers is not None:
            raise CompressError("--layers is for --method depth")
        return StructuredWidth(mlp=mlp or 0.0, kv_groups=kv_groups or 0)
    if mlp is not None or kv_groups is not None:
        raise CompressError("--mlp/--kv-groups are for --method width")
    if layers is None:
        raise CompressError("--method depth needs --layers K (decoder layers to remove)")
    return Depth(layers=layers)


@click.command("prune")
@click.argument("source")
@click.option("--method", type=click.Choice(METHODS), required=True,
              help="magnitude|wanda|sparsegpt: zeros in place; width|depth: a smaller model.")
@click.option("--sparsity", type=float, default=None, help="Fraction of weights to zero per row, in (0, 1).")
@click.option("--pattern", default=None, help="N:M semi-structured sparsity, e.g. 2:4 (H100 sparse tensor cores).")
@click.option("--mlp", type=float, default=None, help="width: fraction of MLP channels to remove, e.g. 0.25.")
@click.option("--kv-groups", type=int, default=None, help="width: whole GQA groups to remove per layer.")
@click.option("--layers", type=int, default=None, help="depth: decoder layers to remove.")
@click.option("--recover-steps", type=click.IntRange(0, None), default=0, show_default=True,
              help="Distillation steps against the unpruned model after pruning (0: none).")
@click.option("--recover-lr", type=float, default=None, help="Distillation learning rate [default: 2e-4].")
@click.option("--recover-seq-len", type=int, default=None, help="Tokens per distillation window [default: 256].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the distillation data order.")
@click.option("--text", default="builtin:pydoc", show_default=True,
              help="Calibration corpus (windows from its END; evaluation reads its start).")
@click.option("--calib-samples", type=click.IntRange(1, None), default=64, show_default=True,
              help="Calibration windows.")
@click.option("--calib-seq-len", type=click.IntRange(2, None), default=512, show_default=True,
              help="Tokens per calibration window.")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output checkpoint dir (written atomically).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickle (.bin) weights. Only for files you trust.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object last on stdout.")
def prune(source, method, sparsity, pattern, mlp, kv_groups, layers, recover_steps, recover_lr, recover_seq_len,
          seed, text, calib_samples, calib_seq_len, out, force, allow_pickle, as_json):
    """Prune SOURCE and write a checkpoint to OUT (an ordinary Hugging Face dir plus kiln.json).

    \b
    kiln compress prune smollm2-135m --method sparsegpt --sparsity 0.5 -o pruned
    kiln compress prune smollm2-135m --method wanda --pattern 2:4 -o pruned-2of4
    kiln compress prune smollm2-135m --method width --mlp 0.25 --recover-steps 64 -o narrow
    kiln compress prune smollm2-135m --method depth --layers 4 --recover-steps 64 -o shallow
    """
    from compress.errors import CompressError
    from compress.prune import Recover, prune_checkpoint

    config = _config(method, sparsity, pattern, mlp, kv_groups, layers)
    recover = None
    if recover_steps:
        kw = {k: v for k, v in (("lr", recover_lr), ("seq_len", recover_seq_len)) if v is not None}
        recover = Recover(steps=recover_steps, seed=seed, **kw)
    elif recover_lr is not None or recover_seq_len is not None:
        raise CompressError("--recover-lr/--recover-seq-len need --recover-steps N")
    res = prune_checkpoint(source, out, config, text=text, calib_samples=calib_samples, calib_seq_len=calib_seq_len,
                           recover=recover, force=force, allow_pickle=allow_pickle, progress=True)
    if as_json:
        emit_json(res)
        return
    st = res["stats"]
    stderr(f"pruned ({method}) in {res['seconds']} s")
    msg = f"wrote {out}: parameters {st['parameters_before']:,} -> {st['parameters_after']:,}"
    if "sparsity" in st:
        msg += f", {st['sparsity']:.1%} zeros in {st['matrices']} matrices"
    if "removed_layers" in st:
        msg += f", removed layers {st['removed_layers']}"
    if "recover" in st:
        msg += f", distillation KL {st['recover']['loss_first']:.4f} -> {st['recover']['loss_last']:.4f}"
    click.echo(msg + f", {res['bytes_on_disk']:,} bytes, passes {' -> '.join(res['passes'])}")


COMMANDS = [prune]
