import re
import warnings

import pytest
import torch
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from difftrain.components.lora import (
    _collate_lora_metadata,
    _set_state_dict_into_text_encoder,
    cast_training_params,
    lora_adapter_metadata,
    set_state_dict_into_text_encoder,
    unet_lora_state_dict,
)

from .tiny_models import UNET_TARGETS, lora_unet, tiny_text_encoder, tiny_unet


def _lora_params(model):
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


def test_unet_lora_state_dict_keys_and_values():
    unet = lora_unet()
    state = unet_lora_state_dict(unet)
    params = _lora_params(unet)
    assert state and len(state) == len(params) == 64
    pattern = re.compile(r"^(.+\.(?:to_k|to_q|to_v|to_out\.0))\.lora\.(down|up)\.weight$")
    for key, value in state.items():
        match = pattern.match(key)
        assert match, key
        peft_name = f"{match.group(1)}.lora_{'A' if match.group(2) == 'down' else 'B'}.default.weight"
        assert torch.equal(value, params[peft_name])


def test_unet_lora_state_dict_equals_upstream_script_idiom():
    unet = lora_unet()
    expected = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    state = unet_lora_state_dict(unet)
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)


def test_unet_lora_state_dict_without_adapter_raises():
    with pytest.raises(ValueError, match="no PEFT adapter"):
        unet_lora_state_dict(tiny_unet())


def test_unet_lora_state_dict_unknown_adapter_name_raises():
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        unet_lora_state_dict(lora_unet(), adapter_name="other")


def test_unet_lora_state_dict_unwraps_data_parallel():
    unet = lora_unet()
    wrapped = torch.nn.DataParallel(unet)
    assert unet_lora_state_dict(wrapped).keys() == unet_lora_state_dict(unet).keys()


def test_cast_training_params_upcasts_only_trainable_params_of_bf16_model():
    unet = tiny_unet()
    unet.requires_grad_(False)
    unet.to(torch.bfloat16)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=UNET_TARGETS))
    before = {name: p.detach().clone() for name, p in unet.named_parameters()}
    assert {p.dtype for p in _lora_params(unet).values()} == {torch.bfloat16}
    cast_training_params(unet, dtype=torch.float32)
    for name, param in unet.named_parameters():
        if param.requires_grad:
            assert "lora_" in name and param.dtype == torch.float32
        else:
            assert param.dtype == torch.bfloat16
        assert torch.equal(param.detach().float(), before[name].float())  # values unchanged by the upcast
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert len(trainable) == 64


def test_cast_training_params_accepts_list_and_tuple():
    models = [torch.nn.Linear(2, 2).to(torch.float16) for _ in range(3)]
    models[1].weight.requires_grad_(False)
    cast_training_params(models[:2])
    cast_training_params((models[2],))
    assert models[0].weight.dtype == torch.float32 and models[0].bias.dtype == torch.float32
    assert models[1].weight.dtype == torch.float16 and models[1].bias.dtype == torch.float32
    assert models[2].weight.dtype == torch.float32


def test_text_encoder_lora_round_trip():
    source = tiny_text_encoder(seed=0)
    target = tiny_text_encoder(seed=0)  # same base weights ...
    with torch.no_grad():
        for param in _lora_params(target).values():
            param.normal_()  # ... different LoRA weights
    ids = torch.tensor([[0, 5, 7, 2]])
    assert not torch.allclose(source(ids).last_hidden_state, target(ids).last_hidden_state)
    saved = convert_state_dict_to_diffusers(get_peft_model_state_dict(source))
    bundle = {f"text_encoder.{k}": v for k, v in saved.items()}
    bundle["unet.down_blocks.0.attn1.to_q.lora.down.weight"] = torch.zeros(2, 4)  # other component: ignored
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unexpected = set_state_dict_into_text_encoder(bundle, "text_encoder.", target)
    assert unexpected == []
    source_lora = _lora_params(source)
    assert len(source_lora) == 16
    for name, param in _lora_params(target).items():
        assert torch.equal(param, source_lora[name]), name
    assert torch.equal(source(ids).last_hidden_state, target(ids).last_hidden_state)


def test_text_encoder_setter_reports_unexpected_keys():
    source = tiny_text_encoder(seed=0)
    target = tiny_text_encoder(seed=1)
    saved = convert_state_dict_to_diffusers(get_peft_model_state_dict(source))
    bundle = {f"text_encoder.{k}": v for k, v in saved.items()}
    bundle["text_encoder.encoder.layers.7.self_attn.q_proj.lora_linear_layer.down.weight"] = torch.zeros(2, 8)
    with pytest.warns(UserWarning, match="unexpected keys"):
        unexpected = _set_state_dict_into_text_encoder(bundle, "text_encoder.", target)
    assert len(unexpected) == 1 and "layers.7" in unexpected[0]


def test_text_encoder_setter_warns_when_prefix_matches_nothing():
    target = tiny_text_encoder()
    before = {n: p.clone() for n, p in _lora_params(target).items()}
    with pytest.warns(UserWarning, match="No key"):
        assert (
            set_state_dict_into_text_encoder(
                {"unet.x.lora.down.weight": torch.zeros(1)}, "text_encoder.", target
            )
            == []
        )
    assert all(torch.equal(p, before[n]) for n, p in _lora_params(target).items())


def test_text_encoder_setter_requires_adapter():
    with pytest.raises(ValueError, match="no PEFT adapter"):
        set_state_dict_into_text_encoder({}, "text_encoder.", tiny_text_encoder(adapter=False))


def test_lora_adapter_metadata():
    unet = lora_unet()
    metadata = lora_adapter_metadata({"unet": unet, "text_encoder": None})
    assert list(metadata) == ["unet_lora_adapter_metadata"]
    assert metadata["unet_lora_adapter_metadata"]["r"] == 2
    assert metadata["unet_lora_adapter_metadata"]["lora_alpha"] == 2
    assert set(metadata["unet_lora_adapter_metadata"]["target_modules"]) == set(UNET_TARGETS)
    assert _collate_lora_metadata is lora_adapter_metadata
    with pytest.raises(ValueError, match="'transformer'"):
        lora_adapter_metadata({"transformer": tiny_unet()})
