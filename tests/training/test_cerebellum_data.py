import numpy as np
import torch

from bids_app.training.augment import AugmentConfig, make_sample
from bids_app.training.prepare import prepare_library_case


def _case(prior=True):
    rng = np.random.default_rng(0)
    t1 = rng.random((16, 16, 16)).astype(np.float32)
    lob = np.zeros((16, 16, 16), np.int16)
    lob[4:8, 4:12, 4:12] = 5
    lob[8:12, 4:12, 4:12] = 113
    full = np.where(lob > 0, 10000 + lob, 3).astype(np.int32)
    full[:2] = 0
    p = rng.random((13, 16, 16, 16)).astype(np.float32) if prior else None
    return prepare_library_case(t1, lob, full, np.eye(4), factor=1, prior=p)


def test_prepare_library_case_arrays():
    arrays = _case()
    assert arrays["img2"].dtype == np.float16 and arrays["img2"].shape == (16, 16, 16)
    assert arrays["prior"].shape == (13, 16, 16, 16)
    assert set(np.unique(arrays["cls2"])) == {0, 5, 26}       # class positions of 0, left VI, right WM
    assert arrays["gen_values"].tolist() == [0, 3, 10005, 10113]
    half = prepare_library_case(arrays["img2"].astype(np.float32), np.zeros((16, 16, 16), np.int16),
                                np.zeros((16, 16, 16), np.int32), np.eye(4), factor=2)
    assert half["img2"].shape == (8, 8, 8) and half["affine2"][0, 0] == 2


def test_make_sample_appends_prior_channels_uncorrupted_and_masks_t1():
    arrays = _case()
    case = {"classes": torch.from_numpy(arrays["cls2"].astype(np.uint8)),
            "image": torch.from_numpy(arrays["img2"].astype(np.float32))[None],
            "prior": torch.from_numpy(arrays["prior"].astype(np.float32))}
    cfg = AugmentConfig.none(crop=(16, 16, 16))
    cfg = AugmentConfig(**{**cfg.__dict__, "mask_to_foreground": 1, "noise_max": 0.1})
    x, y = make_sample(case, cfg, torch.Generator().manual_seed(0), None)
    assert x.shape == (14, 16, 16, 16) and y.shape == (16, 16, 16)
    # the prior channels are the packed prior, untouched by noise/normalisation
    assert torch.allclose(x[1:], case["prior"], atol=1e-3)
    # the T1w is zero away from the (dilated) foreground
    fg = torch.nn.functional.max_pool3d((y > 0).float()[None, None], 3, stride=1, padding=1)[0, 0] > 0
    assert (x[0][~fg] == 0).all() and (x[0][fg] > 0).any()
