import json

import pytest
import torch

from tests.conftest import stage_metrics


def test_dpo_trains_on_synth_and_on_policy_pairs(posttrained):
    _, workdir = posttrained
    run, m = stage_metrics(workdir, "dpo")
    mm = m["models"]["dpo"]
    assert m["base"] == "sft-rationale"
    changed, total = map(int, mm["params_changed"].split("/"))
    assert changed == total and mm["final_loss"] < mm["first_loss"]
    assert 0 < mm["tokens"] <= mm["steps"] * 8 * 2 * 64 and mm["tokens_per_s"] > 0  # chosen and rejected rows
    assert mm["data"]["synth_pairs"] > 0 and mm["data"]["on_policy"]["asked"] == 6
    assert len((run / "ref_logps.jsonl").read_text().splitlines()) == mm["data"]["train_pairs"]


def test_trl_dpo_loss_matches_the_formula(posttrained, tmp_path):
    import torch.nn.functional as F

    from slmforge.artifacts import ArtifactStore
    from slmforge.models.modeling import load_model
    from slmforge.stages import dpo

    _, workdir = posttrained
    store = ArtifactStore(workdir)
    sft_dir = store.resolve("sft:latest").path / "sft"
    items = [json.loads(x) for x in (store.resolve("synth:latest").path / "items.jsonl").read_text().splitlines()]
    pairs = dpo.synth_pairs(items)[:6]
    model, tok = load_model(sft_dir)
    ref, _ = load_model(sft_dir)
    cfg = dpo.Config(beta=0.3, precision="fp32", batch_size=6, max_length=64)
    trainer = dpo.make_trainer(cfg, model, tok, pairs, [], tmp_path / "t")  # its reference: a copy of the SFT model
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy away from the reference, or every margin is 0
        for p in trainer.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()

    model = trainer.model

    def seq_logps(m):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        return (lp * batch["completion_mask"][:, 1:]).sum(-1)

    with torch.no_grad():
        pc, pr = seq_logps(model).chunk(2)
        rc, rr = seq_logps(ref).chunk(2)
    by_hand = -F.logsigmoid(0.3 * ((pc - rc) - (pr - rr))).mean().item()
    assert loss == pytest.approx(by_hand, rel=1e-4, abs=1e-5)
    assert abs(by_hand - 0.6931) > 1e-3  # the policy really differs from the reference


def test_a_loss_type_typo_is_a_recipe_error_before_any_model_loads(tmp_path, small_corpus):
    from slmforge.config import load_recipe
    from slmforge.errors import UserError
    from tests.conftest import post_recipe, write_recipe

    recipe = post_recipe(small_corpus, tmp_path / "w")
    recipe["dpo"]["loss_type"] = "sigmoyd"
    recipe["sft"]["packing"] = "tight"
    with pytest.raises(UserError, match=r"(?s)sft\.packing: Input should be 'auto'.*dpo\.loss_type: Input should be 'sigmoid'"):
        load_recipe(write_recipe(tmp_path, recipe))
    recipe["dpo"]["loss_type"], recipe["sft"]["packing"] = "ipo", "wrapped"
    assert load_recipe(write_recipe(tmp_path, recipe)).stages["dpo"].loss_type == "ipo"
