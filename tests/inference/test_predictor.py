import logging

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.conftest import lps_affine
from tests.models.conftest import even_odds, randomise_adapters, tiny_model_config
from tgated.inference.predictor import Predictor, looks_like, resolve_modality
from tgated.io.volumes import volume_from_array
from tgated.models.tgated import TGatedModel


def _model(**changes):
    model = TGatedModel.from_config(tiny_model_config(**changes))
    randomise_adapters(model)  # neighbours must change the output, or chunking bugs would hide
    even_odds(model)  # foreground and background both present in the label maps
    return model.eval()


def _ct_volume(shape=(37, 29, 11), seed=0):
    rng = np.random.default_rng(seed)
    data = rng.normal(0, 300, size=shape).astype(np.float32) - 200
    return volume_from_array(data, lps_affine())


@pytest.mark.parametrize("mode", ["index", "physical"])
def test_chunked_prediction_equals_whole_stack(mode):
    model = _model(context_mode=mode, context_step_mm=4.0)
    vol = _ct_volume()
    whole = Predictor(model, chunk_slices=1000, batch_size=4).predict_volume(vol, keep_probabilities=True)
    chunked = Predictor(model, chunk_slices=3, batch_size=2).predict_volume(vol, keep_probabilities=True)
    np.testing.assert_array_equal(whole.labels, chunked.labels)
    np.testing.assert_allclose(
        np.asarray(whole.probabilities, np.float32), np.asarray(chunked.probabilities, np.float32), atol=1e-3
    )


def test_probabilities_resampled_before_labels():
    model = _model()
    vol = _ct_volume()
    pred = Predictor(model, batch_size=4).predict_volume(vol, keep_probabilities=True)
    assert pred.labels.shape == vol.shape and pred.labels.dtype == np.uint8
    assert pred.probabilities.shape == (13, *vol.shape) and pred.probabilities.dtype == np.float16
    probs = np.asarray(pred.probabilities, np.float32)
    best = probs.max(axis=0)
    threshold = model.config.preprocess.background_threshold
    fg = pred.labels > 0
    assert fg.any()
    # every labelled voxel carries an organ whose probability is the maximum (float16 ties allowed) ...
    index = {o.id: i for i, o in enumerate(pred.organs)}
    chosen = np.take_along_axis(probs, np.vectorize(lambda v: index.get(v, 0))(pred.labels)[None], axis=0)[0]
    np.testing.assert_allclose(chosen[fg], best[fg], atol=2e-3)
    assert (best[fg] >= threshold - 1e-3).all()
    # ... and background is where no organ reaches the threshold
    assert (best[~fg] < threshold + 1e-3).all()


def test_predictions_follow_the_volume_not_the_array_order():
    """The same anatomy stored LPS or RAS gives the same canonical labels."""
    model = _model()
    vol = _ct_volume()
    flipped = volume_from_array(vol.to_original(vol.data)[::-1, ::-1].copy(), np.diag([0.8, 0.9, 3.0, 1.0]))
    np.testing.assert_array_equal(flipped.data, vol.data)
    a = Predictor(model, batch_size=4).predict_volume(vol).labels
    b = Predictor(model, batch_size=4).predict_volume(flipped).labels
    np.testing.assert_array_equal(a, b)


def test_organ_subset_and_unknown_organs():
    model = _model(organs=["liver", "spleen"])
    pred = Predictor(model, batch_size=4).predict_volume(_ct_volume(), organs=["spleen"])
    assert [o.name for o in pred.organs] == ["spleen"]
    assert set(np.unique(pred.labels).tolist()) <= {0, 3}
    with pytest.raises(ValueError, match="not trained by this model; it segments: liver, spleen"):
        Predictor(model).predict_volume(_ct_volume(), organs=["pancreas"])


def test_modality_detection_and_mismatch_warning(caplog):
    ct = _ct_volume()
    mr = volume_from_array(np.abs(ct.data) + 10, lps_affine())
    assert looks_like(ct) == "ct" and looks_like(mr) == "mr"
    assert resolve_modality(mr, "auto") == "mr"
    with caplog.at_level(logging.WARNING):
        assert resolve_modality(mr, "ct") == "ct"
    assert "look like MR" in caplog.text
    mr.modality = "mr"  # a DICOM tag wins over statistics
    assert resolve_modality(mr, None) == "mr"


def test_cuda_request_without_cuda_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from tgated.inference.predictor import resolve_device

    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def test_segment_api_returns_input_geometry(tmp_path):
    import tgated

    model = _model()
    vol = _ct_volume()
    img = nib.Nifti1Image(vol.to_original(vol.data), lps_affine())
    out = tgated.segment(img, model)
    assert out.shape == img.shape and out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine, img.affine)
    model.save_pretrained(tmp_path / "m")
    nib.save(img, tmp_path / "x.nii.gz")
    again = tgated.segment(tmp_path / "x.nii.gz", tmp_path / "m", device="cpu")
    np.testing.assert_array_equal(np.asanyarray(again.dataobj), np.asanyarray(out.dataobj))


def test_probabilities_stream_in_blocks(monkeypatch):
    """No array of organs × volume probabilities, nor a normalised copy of the volume, is ever made:
    slabs of a chunk are windowed, a few slices' probabilities are resampled at once, and the labels
    equal those of a whole-volume pass."""
    import tgated.inference.predictor as P

    model = _model(context=3)
    vol = _ct_volume(shape=(37, 29, 11))
    reference = Predictor(model, chunk_slices=1000, batch_size=11).predict_volume(vol)
    windowed, resampled = [], []
    apply_window, from_model_grid = P.apply_window, P.from_model_grid
    monkeypatch.setattr(P, "apply_window", lambda x, win: windowed.append(x.shape) or apply_window(x, win))
    monkeypatch.setattr(
        P, "from_model_grid", lambda x, shape: resampled.append(x.shape) or from_model_grid(x, shape)
    )
    monkeypatch.setattr(P, "NATIVE_BLOCK_VALUES", 2 * 13 * 37 * 29)  # two slices of 13 organs
    streamed = Predictor(model, chunk_slices=4, batch_size=3).predict_volume(vol)
    np.testing.assert_array_equal(streamed.labels, reference.labels)
    assert reference.labels.any()
    # chunks of 4 centre slices + 1 neighbour on each side (K = 3), never all 11 slices
    assert windowed == [(37, 29, 5), (37, 29, 6), (37, 29, 4)]
    assert max(s[0] for s in resampled) == 2 and {s[1:] for s in resampled} == {(13, 64, 64)}
    assert sum(s[0] for s in resampled) == 11  # every slice resampled once
