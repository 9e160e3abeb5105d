"""The CLI end to end on builtin:tiny-llama: train, eval, generate, export, methods."""

import json

import pytest
import torch

from tokentune.cli import main
from tests.e2e.helpers import losses, write_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    cfg = write_config(tmp, eval={"at_start": True})
    assert main(["train", str(cfg)]) == 0
    return tmp, tmp / "run"


def test_run_directory_contents(trained):
    _, run = trained
    for name in ["config.yaml", "metrics.jsonl", "data_summary.json", "summary.json", "report.html",
                 "final/adapter_config.json", "final/adapter_model.safetensors", "final/tokenizer.json",
                 "final/tokentune.json"]:
        assert (run / name).exists(), name
    assert len(losses(run)) == 6
    summary = json.loads((run / "summary.json").read_text())
    assert "eval/loss" in summary["before"] and "eval/exact_match" in summary["after"]
    assert summary["after"]["eval/loss"] < summary["before"]["eval/loss"]
    html = (run / "report.html").read_text()
    assert "data:image/png;base64" in html and "lora" in html


def test_refuses_to_overwrite_a_run(trained):
    tmp, _ = trained
    assert main(["train", str(tmp / "config.yaml")]) == 2
    assert main(["train", str(tmp / "config.yaml"), "--resume"]) == 2  # finished: nothing to resume


def test_eval_generate(trained, capsys):
    tmp, run = trained
    assert main(["eval", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    after = json.loads((run / "summary.json").read_text())["after"]
    assert result["eval/loss"] == pytest.approx(after["eval/loss"], rel=1e-5)
    prompts = ["What is 2 plus 3?", "What is 1 plus 1?"]
    assert main(["generate", str(run), "--prompt", prompts[0], "--prompt", prompts[1], "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    # Trained on prompt/completion data, so generate prompts with the raw text (no chat template).
    from tokentune.engine.distributed import DistEnv
    from tokentune.engine.session import build_session, run_config
    from tokentune.probes.generation import generate_ids

    session = build_session(run_config(run), DistEnv(), with_data=False, trained_from=run)
    outs = generate_ids(session.model, session.tokenizer, [session.tokenizer(p)["input_ids"] for p in prompts],
                        max_new_tokens=4)
    assert printed == "".join(session.tokenizer.decode(o, skip_special_tokens=True) + "\n" for o in outs)


def test_export_merge_generates_same_tokens(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokentune.engine.distributed import DistEnv
    from tokentune.engine.session import build_session, run_config
    from tokentune.probes.generation import generate_ids

    _, run = trained
    out = tmp_path / "merged"
    assert main(["export", str(run), "--merge", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    session = build_session(run_config(run), DistEnv(), with_data=False, trained_from=run)
    prompts = [tok("What is 4 plus 4?")["input_ids"], tok("What is 9 plus 1?")["input_ids"]]
    ours = generate_ids(session.model, session.tokenizer, prompts, max_new_tokens=8)
    theirs = generate_ids(merged, tok, prompts, max_new_tokens=8)
    assert ours == theirs
    ids = torch.tensor([prompts[0]])
    torch.testing.assert_close(merged(ids).logits, session.model(ids).logits, rtol=1e-4, atol=1e-4)


def test_methods_lists_registry(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ["lora", "full", "freeze", "cross_entropy", "evaluation"]:
        assert name in out


def test_bad_config_is_a_clear_error(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert main(["train", str(cfg), "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "train.lrr" in err and "did you mean" in err


def test_overrides_after_an_option_are_applied(trained, capsys):
    _, run = trained
    assert main(["eval", str(run), "--json", "eval.max_examples=2", "eval.generate=false"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "eval/loss" in result and "eval/exact_match" not in result  # generate=false took effect
    with pytest.raises(SystemExit):  # a stray word that is no override is still refused
        main(["eval", str(run), "--json", "notanoverride"])


def test_eval_reads_only_the_eval_file(trained, tmp_path, capsys):
    """Held-out plain text after prompt/completion training: the training records are not re-read."""
    _, run = trained
    text = tmp_path / "general.jsonl"
    text.write_text("".join(json.dumps({"text": f"plain passage number {i} about nothing"}) + "\n" for i in range(3)))
    assert main(["eval", str(run), f"data.eval={text}", "data.format=text", "eval.generate=false", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["eval/loss"] > 0 and "eval/exact_match" not in result
