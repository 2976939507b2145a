"""`--mode=eval` on a released (HF) checkpoint: no orbax checkpoint, `model.init_checkpoint=HF_DIR`; the
"before DiG" row of a table comes from the same code as the "after" one."""
from __future__ import annotations

import os
import shutil

import pytest

from dig_jax import assemble
from dig_jax.eval import dig, rec, registry, run
from dig_jax.models import hf_io


def test_an_hf_checkpoint_is_evaluated_without_any_training_checkpoint(eval_config, rec_set, tmp_path, capsys):
    c = eval_config
    c.eval.evaluators = ("dig", "rec")
    c.eval.rec.data_dir, c.eval.rec.image_size, c.eval.rec.max_new_tokens = rec_set[1], 64, 8
    c.eval.rec.splits = ("refcoco_unc/testB",)
    # A "released" model: the tiny random model saved in the HF format, with its tokenizer.
    scratch = str(tmp_path / "scratch")
    tok_path = assemble.tokenizer_path(c, scratch, assemble.model_family(c))
    tokenizer = assemble.load_run_tokenizer(c, tok_path)
    model_cfg = assemble.model_config_from(c, tokenizer)
    ctx = registry.EvalContext(c, model_cfg, tokenizer, tok_path, assemble.make_mesh(c))
    evaluators = [dig.DigEvaluator.from_context(ctx), rec.RecEvaluator.from_context(ctx)]
    patches = registry.common_patches_per_image(evaluators)
    assert patches == evaluators[0].patches_per_image == evaluators[1].patches_per_image
    model = assemble.create_model(c, model_cfg, ctx.mesh, patches)
    hf_dir = str(tmp_path / "Qwen3-VL-tiny")
    hf_io.save_hf_checkpoint(model, model_cfg, hf_dir)
    shutil.copy(tok_path, os.path.join(hf_dir, "tokenizer.json"))
    want = registry.run_evaluators(evaluators, model, 0, str(tmp_path / "in_memory"))

    c.model.init_checkpoint = hf_dir
    workdir = str(tmp_path / "workdir")
    capsys.readouterr()
    got = run.run_eval(c, workdir)
    assert f"no checkpoint in {workdir}: evaluating {hf_dir} as step 0" in capsys.readouterr().out
    assert got == {**{k[len("dig/"):]: v for k, v in want.items() if k.startswith("dig/")},
                   **{k: v for k, v in want.items() if k.startswith("rec/")}}
    assert os.path.exists(os.path.join(workdir, "eval", "step_0", "rec", "predictions.jsonl"))


def test_no_checkpoint_and_no_hf_directory_is_named(eval_config, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoints holds steps \[\], not any .*init_checkpoint=HF_DIR"):
        run.run_eval(eval_config, str(tmp_path))
