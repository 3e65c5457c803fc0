"""The recipe's section machinery: validation only reads, and the moe_lora entry becomes a config afterwards."""

from __future__ import annotations

import copy

from training_testutils import REPO, tiny_recipe

from moe_lora import MoELoRAConfig
from moe_lora.training.recipe import Recipe, load_recipe, read_moe_lora


def test_validation_reads_and_conversion_is_its_own_step(tmp_path):
    recipe = load_recipe(tiny_recipe(tmp_path))
    assert isinstance(recipe.moe_lora, MoELoRAConfig)
    for entry in (recipe.moe_lora.to_dict(), str(REPO / "configs" / "adamole.yaml")):
        recipe.moe_lora = copy.deepcopy(entry)
        assert recipe.problems() == []
        assert recipe.moe_lora == entry, "problems() must not turn moe_lora into a MoELoRAConfig"
        config, problems = read_moe_lora(entry, recipe.resolve)
        assert isinstance(config, MoELoRAConfig) and problems == [] and recipe.moe_lora == entry
    config, problems = read_moe_lora({"rank": 0}, recipe.resolve)
    assert config is None and problems == ["moe_lora.rank: 0 must be an int >= 1"]


def test_sections_and_help_come_from_the_fields():
    text = Recipe.help()
    assert "  data.synthetic.num_examples (default 4000):  Number of generated examples" in text
    assert "model:  The base model." in text and "ep_size (default 1):" in text
