"""The δ-mem scheme of `user_metadata`: string values, validated once, errors naming the key."""

import pytest

from mintd.lora_config import DeltaMemSpec, delta_mem_from_metadata, is_weight


def test_plain_lora_and_the_users_own_keys():
    assert delta_mem_from_metadata({}) is None
    assert delta_mem_from_metadata({"adapter_name": "poet", "mintd.adapter": "lora", "team": "x"}) is None


def test_delta_mem_fields_from_strings():
    spec = delta_mem_from_metadata(
        {
            "mintd.adapter": "delta_mem+lora",
            "mintd.delta_mem.rank": "4",
            "mintd.delta_mem.alpha": "8",
            "mintd.delta_mem.readout_init": "base_slice",
            "mintd.delta_mem.seed": "7",
        }
    )
    assert spec == DeltaMemSpec(rank=4, alpha=8.0, readout_init="base_slice", seed=7, lora=True)
    assert spec.scale == 2.0
    assert delta_mem_from_metadata({"mintd.adapter": "delta_mem"}) == DeltaMemSpec()


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"mintd.adapter": "dmem"}, r'user_metadata\["mintd.adapter"\]: \'dmem\' is not one of'),
        (
            {"mintd.adapter": "delta_mem", "mintd.delta_mem.rank": "0"},
            r'\["mintd.delta_mem.rank"\]: Input should be',
        ),
        ({"mintd.adapter": "delta_mem", "mintd.delta_mem.rank": "eight"}, r'\["mintd.delta_mem.rank"\]'),
        ({"mintd.adapter": "delta_mem", "mintd.delta_mem.alpha": "nan"}, r'\["mintd.delta_mem.alpha"\]'),
        (
            {"mintd.adapter": "delta_mem", "mintd.delta_mem.readout_init": "x"},
            r'\["mintd.delta_mem.readout_init"\]',
        ),
        (
            {"mintd.adapter": "delta_mem", "mintd.delta_mem.rank": 8},
            r'\["mintd.delta_mem.rank"\]: must be a string',
        ),
        (
            {"mintd.adapter": "delta_mem", "mintd.delta_mem.lora": "true"},
            r'\["mintd.delta_mem.lora"\]: not a mintd',
        ),
        ({"mintd.adapter": "delta_mem", "mintd.rank": "8"}, r'\["mintd.rank"\]: not a mintd setting'),
        ({"mintd.delta_mem.rank": "8"}, r'\["mintd.delta_mem.rank"\]: needs "mintd.adapter": "delta_mem"'),
    ],
)
def test_bad_values_name_the_key(metadata, message):
    with pytest.raises(ValueError, match=message):
        delta_mem_from_metadata(metadata)


def test_weight_names():
    assert is_weight("model.layers.0.self_attn.q_proj.lora_A")
    assert is_weight("delta_mem.layers.3.read_q")
    assert not is_weight("delta_mem.layers.3.read_q.exp_avg_sq")
    assert not is_weight("model.layers.0.self_attn.q_proj.lora_A.step")
