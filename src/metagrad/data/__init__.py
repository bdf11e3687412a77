"""Datasets and a tensor batch pipeline.

- :func:`load_cifar10` reads CIFAR-10 from the official python release (``cifar-10-python.tar.gz``
  or its extracted ``cifar-10-batches-py/``) or from an image-folder layout
  (``train/<class>/*``, ``test/<class>/*``) as a directory or a ``.zip``. It decodes once into
  uint8 tensors and caches them as a ``.pt`` file.
- :func:`download_cifar10` fetches the official release and checks its md5.
- :func:`load_digits_dataset` is scikit-learn's 8x8 digits: a small offline demo dataset.
- :func:`augment_batch`, :func:`normalize` and :class:`BatchLoader` work on whole batches of
  tensors (no per-image Python), reproducibly and resumably.

Safety: archives are read in memory, member by member, and never extracted (members with absolute
paths or ``..`` are refused anyway); a member or file larger than its format allows
(:data:`MAX_BATCH_BYTES`, :data:`MAX_META_BYTES`, :data:`MAX_IMAGE_BYTES`) is refused before it is
read, and reads stop at the limit whatever a header claims; pickled batches go through an
unpickler that only builds numpy arrays. Every problem with a dataset raises :class:`DatasetError`
with one line that names the path and what was expected.

The modules, one job each: :mod:`~metagrad.data.images` (the dataset type),
:mod:`~metagrad.data.cifar10` (finding and loading a layout), :mod:`~metagrad.data.release` and
:mod:`~metagrad.data.image_folder` (the readers), :mod:`~metagrad.data.safe_read` (bounded reads),
:mod:`~metagrad.data.cache`, :mod:`~metagrad.data.download`, :mod:`~metagrad.data.digits`,
:mod:`~metagrad.data.loader` (batches), :mod:`~metagrad.data.errors` and
:mod:`~metagrad.data.corpus` (character corpora).
"""

from metagrad.data.cifar10 import load_cifar10
from metagrad.data.digits import load_digits_dataset
from metagrad.data.download import CIFAR10_MD5, CIFAR10_URL, download_cifar10, needs_download
from metagrad.data.errors import DatasetError
from metagrad.data.image_folder import MAX_IMAGE_BYTES
from metagrad.data.images import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, ImageDataset
from metagrad.data.loader import BatchLoader, augment_batch, normalize
from metagrad.data.release import MAX_BATCH_BYTES, MAX_META_BYTES

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MD5",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10_URL",
    "MAX_BATCH_BYTES",
    "MAX_IMAGE_BYTES",
    "MAX_META_BYTES",
    "BatchLoader",
    "DatasetError",
    "ImageDataset",
    "augment_batch",
    "download_cifar10",
    "load_cifar10",
    "load_digits_dataset",
    "needs_download",
    "normalize",
]
