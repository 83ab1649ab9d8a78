"""The registry: entry-point loading, failures reported by name, lookups, descriptor validation."""
from __future__ import annotations

import dataclasses
import importlib.metadata as md

import pytest

import overdrive
from overdrive import Kind, MethodConfig, MethodSpec, OverdrivePluginWarning, UnknownMethodError
from overdrive.registry import ENTRY_POINT_GROUP, Registry
from overdrive.testing.distributions import install_broken_plugin, install_example_plugin


@dataclasses.dataclass
class _Cfg(MethodConfig):
    level: int = 1


def _spec(name: str, kind: Kind = Kind.WEIGHT_QUANT) -> MethodSpec:
    return MethodSpec(name=name, kind=kind, config_cls=_Cfg, paper="test", impl=object())


class _Plugin:
    def __init__(self, *specs: MethodSpec) -> None:
        self.specs = specs

    @overdrive.hookimpl
    def overdrive_methods(self):
        return list(self.specs)


def test_overdrive_own_entry_point_group_is_declared():
    # Built-in methods register through the same group a third party uses: the group must be the
    # one pyproject declares and the one the registry reads.
    assert ENTRY_POINT_GROUP == "overdrive.plugins"
    dist = md.distribution("overdrive")
    groups = {ep.group for ep in dist.entry_points}
    assert {"vllm.general_plugins", "sglang.srt.plugins"} <= groups
    assert {ep.value for ep in dist.entry_points if ep.group == "vllm.general_plugins"} == {
        "overdrive.adapters.vllm:register"}


def test_third_party_plugin_is_found_through_entry_points(example_plugin):
    reg = example_plugin
    assert {"example_w8", "example_stepcache"} <= set(reg.names())
    spec = reg.get("example_w8")
    assert spec.kind is Kind.WEIGHT_QUANT and spec.plugin == "example"
    assert reg.get("example_stepcache").kind is Kind.DIT_CACHE
    assert "example_stepcache" in [s.name for s in reg.methods(Kind.DIT_CACHE)]
    assert "example_w8" not in [s.name for s in reg.methods(Kind.DIT_CACHE)]


def test_broken_plugin_is_reported_by_name_and_others_load(tmp_path, monkeypatch):
    root = tmp_path / "site"
    install_example_plugin(root)
    install_broken_plugin(root)
    monkeypatch.syspath_prepend(str(root))
    with pytest.warns(OverdrivePluginWarning, match=r"'broken'.*overdrive-broken-plugin.*missing dependency"):
        reg = Registry()
    assert [f.plugin for f in reg.failures] == ["broken"]
    assert reg.failures[0].distribution == "overdrive-broken-plugin"
    assert "example_w8" in reg.names()


def test_unknown_method_lists_known_names(example_plugin):
    with pytest.raises(UnknownMethodError) as e:
        overdrive.get_method("nope")
    assert "'nope'" in str(e.value) and "example_stepcache" in str(e.value) and "example_w8" in str(e.value)
    # restricted to a kind: only that kind's names are offered
    with pytest.raises(UnknownMethodError) as e:
        overdrive.get_method("example_w8", Kind.DIT_CACHE)
    assert "example_stepcache" in str(e.value) and "example_w8;" not in str(e.value)


def test_hook_that_raises_and_invalid_results_are_reported():
    class Raising:
        @overdrive.hookimpl
        def overdrive_methods(self):
            raise RuntimeError("boom")

    reg = Registry(entry_points=[])
    with pytest.warns(OverdrivePluginWarning, match="'bad'.*boom"):
        reg.register(Raising(), name="bad")
    reg.register(_Plugin(_spec("good_one")), name="good")
    assert reg.names() == ["good_one"]
    with pytest.warns(OverdrivePluginWarning, match="not a MethodSpec"):
        reg.register(_Plugin("not a spec"), name="weird")  # type: ignore[arg-type]


def test_duplicate_method_name_keeps_the_first_and_says_so():
    reg = Registry(entry_points=[])
    reg.register(_Plugin(_spec("same")), name="first")
    with pytest.warns(OverdrivePluginWarning, match="already provided by plugin 'first'"):
        reg.register(_Plugin(_spec("same", Kind.DIT_CACHE)), name="second")
    assert reg.get("same").plugin == "first"


@pytest.mark.parametrize("name", ["Upper", "a", "has-dash", "1start", "x" * 41])
def test_method_names_are_validated(name):
    with pytest.raises(ValueError, match="method name"):
        _spec(name)


def test_descriptor_checks_config_class_and_kind():
    with pytest.raises(TypeError, match="MethodConfig subclass"):
        MethodSpec(name="ok_name", kind=Kind.WEIGHT_QUANT, config_cls=dict, paper="p", impl=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown method kind 'bogus'"):
        MethodSpec(name="ok_name", kind="bogus", config_cls=_Cfg, paper="p", impl=None)  # type: ignore[arg-type]
    assert MethodSpec(name="ok_name", kind="dit_caching", config_cls=_Cfg, paper="p", impl=None).kind is Kind.DIT_CACHE


def test_lazy_impl_is_imported_only_when_asked(example_plugin):
    import sys

    spec = overdrive.get_method("example_stepcache")
    assert "overdrive_example.stepcache" not in sys.modules  # listing methods imported no diffusers code
    impl = spec.load_impl()
    assert type(impl).__name__ == "StepCacheMethod"


def test_make_config_validates_options(example_plugin):
    spec = overdrive.get_method("example_stepcache")
    assert spec.make_config({"interval": 3}).interval == 3
    assert spec.make_config(None, interval=4).interval == 4
    with pytest.raises(overdrive.ConfigError, match=r"unknown option\(s\) \['intervl'\].*known: \['interval'"):
        spec.make_config({"intervl": 3})
    with pytest.raises(overdrive.ConfigError, match="interval must be >= 1"):
        spec.make_config(interval=0)
