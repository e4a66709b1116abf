"""Phantoms are pinned bit for bit: SHA-256 of generated arrays and of the files a layout writes.

The phantom generator is deterministic by contract (same arguments, byte-identical arrays); these
checksums were taken before the generator was restructured and must not change when its code moves.
A deliberate change of the phantoms (new anatomy, new intensities) updates them in the same commit.
"""

from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pytest

from tgated.data.phantom import make_phantom, write_dataset

ARRAYS = {
    ('ct', 0): {
        'image': 'a655a2eaea389472a20da5a9737d45c4ddbf56d3364d7488b7a5604355ce33f6',
        'labels': '4ec0f2bfbc1970af790ff049fc2e004d8d05176c6930a3f22e3f55d440a6f245',
        'tissue': '39959fc746451eac4dd54f0852c772714c80fae9efeddf57b45ed82cb541c0c5',
        'affine': '5f1651056a815fec7c8415a6dcc8a6cf35c1a4e7e410dbd62fb1207cee61ca91',
    },
    ('ct', 5): {
        'image': 'e012e61033a3d43caae95353940185e8245d72b4d6f62a1deb141cc7a601845d',
        'labels': '3c2e3708526538aab7d9926b4c9f34bed67d5a4d36c328f77a840dc54c9032f4',
        'tissue': 'ad93017e78f85fc06abba3131f8adad3ee61143f98c29e1ada2d06dea5f4869b',
        'affine': 'd19e1e07946ea3b2dd3009993f68b0aa3eac10b87c849b61e28eaef04d852345',
    },
    ('mr', 0): {
        'image': '72a5af21a391aba11f1add23f90ea1d9babd1fed130d41effc72ed394cf2248e',
        'labels': '4ec0f2bfbc1970af790ff049fc2e004d8d05176c6930a3f22e3f55d440a6f245',
        'tissue': 'd01e7617669c730c6138aac087afa5530b531c1a6a4f2ec1e3602e17dc37a95c',
        'affine': '5f1651056a815fec7c8415a6dcc8a6cf35c1a4e7e410dbd62fb1207cee61ca91',
    },
    ('mr', 5): {
        'image': 'a98e9db71944426094bd1a48575edf30bf9c22e79e83d8e0705f2757f4c7289a',
        'labels': '3c2e3708526538aab7d9926b4c9f34bed67d5a4d36c328f77a840dc54c9032f4',
        'tissue': 'b3b5688999f57d535332564823802069c9afd5ab5cbe6fbcbfca4588646a34f1',
        'affine': 'd19e1e07946ea3b2dd3009993f68b0aa3eac10b87c849b61e28eaef04d852345',
    },
}

FILES = {
    ('btcv', 'img/img0001.nii.gz'): (
        '6f5ed65651436492384846857633cb84fc72418db720960d3dcff509097b6c79',
        'bcc5f2f37638f1c9daf6d5817bbb2b2f014b576e864140a66c9dfed6f3de6f73',
    ),
    ('btcv', 'img/img0002.nii.gz'): (
        '593eb71ed6b619e746d71c71598aa72a9ba9aa1f9b8417f44c61ff81c14a2d41',
        '6375573f434de77c7670766fc159cde9138c537174211783f300007fc41d5c69',
    ),
    ('btcv', 'label/label0001.nii.gz'): (
        '36388fc7054c2006ab6bc008a9023b9d8a827838476cf4032edf3f28dc79caf1',
        'bcc5f2f37638f1c9daf6d5817bbb2b2f014b576e864140a66c9dfed6f3de6f73',
    ),
    ('btcv', 'label/label0002.nii.gz'): (
        '381cb44fcaf5db5de95bb60829013f633d55ab7fa5636a8fff853723c9e83d9d',
        '6375573f434de77c7670766fc159cde9138c537174211783f300007fc41d5c69',
    ),
    ('amos', 'imagesTr/amos_0501.nii.gz'): (
        '5ad879eb74ca2666e019c5ec76822330457befe3f26457c7d17366c2bb593de1',
        'bcc5f2f37638f1c9daf6d5817bbb2b2f014b576e864140a66c9dfed6f3de6f73',
    ),
    ('amos', 'imagesTr/amos_0502.nii.gz'): (
        'a3a7e03a8122157e514b9e8aa9af52c47f9ce66bbba0edfa7cfd0469a1ba235b',
        '6375573f434de77c7670766fc159cde9138c537174211783f300007fc41d5c69',
    ),
    ('amos', 'labelsTr/amos_0501.nii.gz'): (
        '1c4f2d90c79293f026c9164bf2fbe10b8b8cb5073a4dc77eea0caffe493678a2',
        'bcc5f2f37638f1c9daf6d5817bbb2b2f014b576e864140a66c9dfed6f3de6f73',
    ),
    ('amos', 'labelsTr/amos_0502.nii.gz'): (
        '54909955aeadee47edd2ca9bacee7342a53ee6f638f6401e7a976dafe8decc47',
        '6375573f434de77c7670766fc159cde9138c537174211783f300007fc41d5c69',
    ),
}


def _sha(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()


@pytest.mark.parametrize(("modality", "seed"), list(ARRAYS))
def test_generated_arrays_are_unchanged(modality, seed):
    ph = make_phantom(seed, case=1, modality=modality, size=48)
    got = {k: _sha(getattr(ph, k)) for k in ARRAYS[(modality, seed)]}
    assert got == ARRAYS[(modality, seed)]


@pytest.mark.parametrize(("layout", "modality"), [("btcv", "ct"), ("amos", "mr")])
def test_written_layout_files_are_unchanged(tmp_path, layout, modality):
    write_dataset(tmp_path, cases=2, seed=3, layout=layout, modality=modality, size=40, quiet=True)
    got = {}
    for f in sorted(tmp_path.rglob("*.nii.gz")):
        img = nib.load(f)
        got[(layout, str(f.relative_to(tmp_path)))] = (_sha(np.asarray(img.dataobj)), _sha(img.affine))
    assert got == {k: v for k, v in FILES.items() if k[0] == layout}
