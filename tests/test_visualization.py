"""Model graphs (Torch-RecHub's ``visualize_model`` and the trainers' ``visualization``), compared with
the reference's graph of its own model built from the same features."""

import re

import pytest
import torch

pytest.importorskip("torchview")
graphviz = pytest.importorskip("graphviz")

from rechub_lightning import CTRTrainer, DenseFeature, MatchTrainer, MTLTrainer, SequenceFeature, SparseFeature  # noqa: E402
from rechub_lightning.models.matching import DSSM  # noqa: E402
from rechub_lightning.models.multi_task import MMOE  # noqa: E402
from rechub_lightning.models.ranking import DIN, DeepFM  # noqa: E402
from rechub_lightning.visualization import visualize_model  # noqa: E402

_INPUT = re.compile(r"input-tensor<BR/>depth:0</TD><TD>([^<]*)<")
_CLUSTER = re.compile(r"label=(\w+) labeljust")


def _deepfm(features_module):
    sf = [features_module.SparseFeature(f"c{i}", vocab_size=10 + i, embed_dim=4) for i in range(3)]
    dense = [features_module.DenseFeature("d0")]
    return sf, dense


def _our_deepfm():
    import rechub_lightning.features as F

    sf, dense = _deepfm(F)
    return DeepFM(deep_features=sf + dense, fm_features=sf, mlp_params={"dims": [8]})


def test_graph_matches_the_reference_deepfm(tmp_path, monkeypatch):
    rf = pytest.importorskip("torch_rechub.basic.features")
    from torch_rechub.models.ranking import DeepFM as RefDeepFM
    from torch_rechub.utils.visualization import visualize_model as ref_visualize

    sf, dense = _deepfm(rf)
    ref_model = RefDeepFM(deep_features=sf + dense, fm_features=sf, mlp_params={"dims": [8]})
    # the reference renders even .gv through `dot`, which this machine may lack: skip its rendering
    monkeypatch.setattr(graphviz.Digraph, "render", lambda self, *a, **k: None)
    ref = ref_visualize(ref_model, batch_size=3, save_path=str(tmp_path / "ref.pdf")).visual_graph.source
    monkeypatch.undo()

    path = tmp_path / "sub" / "ours.gv"
    ours = visualize_model(_our_deepfm(), batch_size=3, save_path=path).visual_graph.source
    assert path.read_text() == ours  # the source was written without `dot`
    # one input node per feature, each with the batch's rows, as in the reference (whose generated
    # dense input is (B, 1); ours is (B,), both legal for a one-dimensional dense feature)
    assert sorted(_INPUT.findall(ref)) == ["(3, 1)"] + ["(3,)"] * 3
    assert _INPUT.findall(ours) == ["(3,)"] * 4
    # the same building blocks drawn as nested clusters
    assert {"EmbeddingLayer", "LR", "MLP"} <= set(_CLUSTER.findall(ours)) & set(_CLUSTER.findall(ref))
    assert 'dpi=300' in ours


def test_sequence_inputs_take_seq_length_and_the_model_is_left_as_it_was(tmp_path):
    item = SparseFeature("item", vocab_size=30, embed_dim=4)
    hist = SequenceFeature("hist", vocab_size=30, embed_dim=4, pooling="concat", shared_with="item")
    model = DIN(features=[SparseFeature("user", 9, 4)], history_features=[hist], target_features=[item],
                mlp_params={"dims": [8]}, attention_mlp_params={"dims": [8]})
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = visualize_model(model, batch_size=2, seq_length=7, save_path=tmp_path / "din.dot", dpi=72)
    shapes = sorted(_INPUT.findall(g.visual_graph.source))
    assert shapes == ["(2, 7)", "(2,)", "(2,)"]
    assert g.visual_graph.graph_attr["dpi"] == "72"
    assert model.training  # torchview traced in eval mode and restored train mode
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_input_data_is_used_as_given(tmp_path):
    x = {"c0": torch.tensor([1, 2, 3, 4, 5]), "c1": torch.zeros(5, dtype=torch.long),
         "c2": torch.ones(5, dtype=torch.long), "d0": torch.rand(5)}
    g = visualize_model(_our_deepfm(), input_data=x, save_path=tmp_path / "m.gv")
    assert sorted(_INPUT.findall(g.visual_graph.source)) == ["(5,)"] * 4


def _mmoe():
    feats = [SparseFeature("a", 20, 4), DenseFeature("d")]
    return MMOE(feats, task_types=["classification", "classification"], n_expert=2,
                expert_params={"dims": [8]}, tower_params_list=[{"dims": [4]}] * 2)


def _dssm():
    user, item = [SparseFeature("user", 12, 4)], [SparseFeature("item", 15, 4)]
    return DSSM(user, item, user_params={"dims": [8]}, item_params={"dims": [8]})


@pytest.mark.parametrize(
    "make, trainer_cls, n_inputs",
    [(_our_deepfm, CTRTrainer, 4), (_mmoe, MTLTrainer, 2), (_dssm, MatchTrainer, 2)],
    ids=["ctr", "mtl", "match"],
)
def test_trainers_visualization(tmp_path, make, trainer_cls, n_inputs):
    model = make()
    kwargs = {"task_types": ["classification", "classification"]} if trainer_cls is MTLTrainer else {}
    trainer = trainer_cls(model, model_path=str(tmp_path), **kwargs)
    g = trainer.visualization(batch_size=4, save_path=str(tmp_path / "graph.gv"), depth=1)
    assert _INPUT.findall(g.visual_graph.source) == ["(4,)"] * n_inputs
    assert (tmp_path / "graph.gv").read_text() == g.visual_graph.source


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        visualize_model(_our_deepfm(), batch_size=0)
    with pytest.raises(ValueError, match=r"save_path='.*model\.xyz'.*'xyz'"):
        visualize_model(_our_deepfm(), save_path=str(tmp_path / "model.xyz"))


def test_rendering_without_dot_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` here
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match=r"saving .*model\.png.* needs Graphviz's `dot`.*\.gv"):
        visualize_model(_our_deepfm(), save_path=str(tmp_path / "model.png"))
    with pytest.raises(RuntimeError, match="opening the graph in a viewer needs Graphviz's `dot`"):
        visualize_model(_our_deepfm())
    assert not list(tmp_path.iterdir())  # nothing left in the working directory


def test_missing_torchview_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchview", None)
    with pytest.raises(ImportError, match=r"rechub-lightning\[visualization\]"):
        visualize_model(_our_deepfm())


def test_rendered_file_lands_at_save_path(tmp_path, monkeypatch):
    """With `dot` present (faked here: this machine has none) the image is moved to save_path and
    graphviz's intermediate files stay out of the target folder."""
    calls = []

    def fake_render(self, filename, directory, format, cleanup):
        calls.append((format, self.graph_attr["dpi"]))
        out = f"{directory}/{filename}.{format}"
        with open(out, "w") as f:
            f.write(self.source)
        return out

    monkeypatch.setattr(graphviz.Digraph, "render", fake_render)
    g = visualize_model(_our_deepfm(), save_path=str(tmp_path / "figs" / "model.svg"), dpi=150)
    assert calls == [("svg", "150")]
    assert [p.name for p in (tmp_path / "figs").iterdir()] == ["model.svg"]
    assert (tmp_path / "figs" / "model.svg").read_text() == g.visual_graph.source
    visualize_model(_our_deepfm(), save_path=str(tmp_path / "noext"))  # no extension: PDF, as in the reference
    assert (tmp_path / "noext.pdf").exists() and calls[-1][0] == "pdf"


def test_youtube_sbc_graph_includes_its_sample_weight_input(tmp_path):
    """YoutubeSBC's forward reads the item-probability column of its `sample_weight_feature` (a
    singular attribute): the generated input must hold it, or tracing fails with a KeyError."""
    from rechub_lightning.data import MatchDataModule
    from rechub_lightning.export import model_features
    from rechub_lightning.models.matching import YoutubeSBC

    schema = MatchDataModule(mode=2, neg_ratio=3, synthetic_users=40, synthetic_items=80, synthetic_interactions=(6, 10),
                             seq_max_len=8, embed_dim=8).schema
    model = YoutubeSBC(user_params={"dims": [16, 8]}, item_params={"dims": [16, 8]}, n_neg=3, schema=schema)
    names = [f.name for f in model_features(model)]
    assert model.sample_weight_feature[0].name in names
    g = visualize_model(model, batch_size=3, seq_length=8, save_path=tmp_path / "sbc.gv")
    assert len(_INPUT.findall(g.visual_graph.source)) == len(names)
