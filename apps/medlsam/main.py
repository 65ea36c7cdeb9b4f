"""MedLSAM Label: a MONAI Label app for CT organ segmentation from a few labelled templates.

    monailabel start_server --app apps/medlsam --studies <datastore> --conf models medlsam

Every --conf key, infer option and train option is declared once, in lib/option_spec.py (name, type, range or
choices, default, meaning), read by lib/options.py (a bad or unknown --conf key stops the start naming it; a bad
request option is a 400 naming it) and listed in docs/configuration.md, which scripts/gen_configuration.py writes
from the spec.

Requests name datastore images by id only; uploads and labels are checked (lib/datastore.py); inference runs in
worker threads, so /info/ and light requests answer while it runs (lib/server.py); the front door (hosts, CORS,
/logs/, time bounds) is lib/guard.py.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Dict

try:  # the app runs on the installed medlsam library (pip install . or make setup), never on a path edit
    import medlsam  # noqa: F401
except ImportError as exc:  # pragma: no cover
    raise ImportError("the medlsam library is not installed in this Python: `pip install .` in the checkout") from exc

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.class_utils import get_class_names

import lib.configs
from lib.conf import conf_value, parse_bool, parse_conf
from lib.datastore import GatedDatastore, valid_name
from lib.option_spec import COMMON_INFER_OPTIONS
from lib.options import OptionError, option, read
from lib.template_source import TemplateSource

logger = logging.getLogger(__name__)
_SAVE_LABEL = option(COMMON_INFER_OPTIONS, "save_label")


class MedLSAMApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        options = parse_conf(conf)  # every --conf key checked before anything starts (lib/option_spec.py)
        if (conf or {}).get("max_voxels") not in (None, ""):  # read by every image reader, training children too
            os.environ["MEDLSAM_MAX_VOXELS"] = str(options["max_voxels"])
        self.model_dir = os.path.join(app_dir, "model")
        os.makedirs(self.model_dir, exist_ok=True)
        configs = {c.split(".")[-2].lower(): c for c in get_class_names(lib.configs, "TaskConfig")}
        models = list(options["models"])
        unknown = [m for m in models if m not in configs and m != "all"]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; available: {sorted(configs)}")
        if "all" in models:
            models = sorted(configs)
        self.models: Dict[str, TaskConfig] = {}
        for name in models:
            config = get_class_of(configs[name])()
            config.init(name, self.model_dir, conf or {}, None, app_dir=app_dir, datastore=self.datastore)
            self.models[name] = config
        logger.info(f"+++ Using models: {list(self.models)}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf or {},
            name="MedLSAM Label",
            description="CT organ segmentation from a few templates: MedLAM localisation + SAM, "
            "interactive SAM clicks, self-supervised MedLAM training",
            version="0.1.0",
        )

    def init_datastore(self) -> Datastore:
        """MONAI Label's local datastore behind the id/tag gate and label checks; a DICOMweb URL gets the app's
        DICOMweb datastore (lib/dicomweb.py: DICOM SEG labels as templates)."""
        if self.studies.startswith(("http://", "https://")):
            from lib.dicomweb import MedLSAMDicomWebDatastore
            from medlsam.io.dicom import dcmqi_tool

            logger.info(f"Init DICOMweb Datastore for: {self.studies} (labels: DICOM SEG; dcmqi {dcmqi_tool()})")
            cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or None
            return MedLSAMDicomWebDatastore(
                self.studies,
                settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
                cache,
                on_label_change=self._labels_changed,
                read_timeout_s=conf_value(self.conf, "dicomweb_timeout"),
                rt_synonyms=conf_value(self.conf, "rt_synonyms"),
            )
        studies, app_dir = os.path.realpath(self.studies), os.path.realpath(self.app_dir)
        if studies == app_dir or studies.startswith(app_dir + os.sep):
            raise ValueError(
                f"the datastore {self.studies} lies inside the app folder {self.app_dir}: uploads could "
                "overwrite the app's code or weights; use a separate folder"
            )
        logger.info(f"Init Datastore for: {self.studies} (ids and tags gated, labels checked on save)")
        return GatedDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            on_label_change=self._labels_changed,
            organ_names=self._organ_names,
        )

    def init_infers(self) -> Dict[str, InferTask]:
        infers: Dict[str, InferTask] = {}
        for config in self.models.values():
            tasks = config.infer()
            infers.update(tasks if isinstance(tasks, dict) else {config.name: tasks})
        return infers

    def init_trainers(self) -> Dict[str, TrainTask]:
        trainers: Dict[str, TrainTask] = {}
        for name, config in self.models.items():
            tasks = config.trainer()
            if tasks is not None:
                trainers.update(tasks if isinstance(tasks, dict) else {name: tasks})
        return trainers

    def init_batch_infer(self):
        from lib.batch_infer import MedLSAMBatchInfer

        return MedLSAMBatchInfer()

    def init_strategies(self):
        from monailabel.tasks.activelearning.first import First
        from monailabel.tasks.activelearning.random import Random

        return {"random": Random(), "first": First()}

    def on_init_complete(self):
        """The server is up: its heavy endpoints run off the event loop, with parameter checks."""
        if "monailabel.app" in sys.modules:
            from lib.server import install

            install(sys.modules["monailabel.app"].app, self.conf)
        super().on_init_complete()
        self._labels_changed()  # build the template bank now, so the first request does not wait for it

    def info(self):
        """MONAI Label's /info/ plus the template bank's build progress (``template_bank``)."""
        meta = super().info()
        source = self._template_source()
        if source is not None:
            meta["template_bank"] = source.progress()
        return meta

    def infer(self, request, datastore=None):
        """Only datastore images (by id) or this server's sessions are read; a final label is never written."""
        request = dict(request)
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(
                status_code=404, detail=f"no model {str(model)[:80]!r}; available: {sorted(self._infers)}"
            )
        try:
            save = read(_SAVE_LABEL, request.pop("save_label", None), "infer option")
        except OptionError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        tag = request.pop("label_tag", None) or DefaultLabelTag.ORIGINAL.value
        if save and tag != DefaultLabelTag.ORIGINAL.value:
            raise HTTPException(
                status_code=400,
                detail=f"label_tag {str(tag)[:80]!r}: inference saves only "
                "'original' labels; submit a final label with PUT "
                "/datastore/label",
            )
        self._label_file(request)
        store = datastore or self.datastore()
        image = request.get("image")
        session = self._session_image(request)
        if session:
            request["image"], request["image_id"], save = session, "session", False
        else:
            path = store.get_image_uri(image) if valid_name(image) else ""
            if not path:
                raise HTTPException(
                    status_code=404,
                    detail=f"image {str(image)[:80]!r} not found in the datastore "
                    "(GET /datastore/?output=all lists the image ids)",
                )
            request["image"], request["image_id"] = path, image
        from lib.server import RTSTRUCT_OUTPUT

        rtstruct = RTSTRUCT_OUTPUT.get()
        if rtstruct and not hasattr(store, "rtstruct_of"):
            raise HTTPException(
                status_code=400,
                detail="output=rtstruct needs a DICOM image: start the server on a DICOMweb datastore (the structure "
                "set references the CT series' instances)",
            )
        result = super().infer(request, store)
        if save and result.get("file"):
            result["label"] = store.save_label(image, result["file"], DefaultLabelTag.ORIGINAL.value, {"model": model})
        if rtstruct and result.get("file"):
            names = (result.get("params") or {}).get("label_names") or {}
            stow = parse_bool(request.get("stow", False)) is True
            result["file"] = store.rtstruct_of(image, result["file"], names, stow=stow)
        return result

    @staticmethod
    def _label_file(request: dict) -> None:
        """``label_file``: the request's label file, only when the client uploaded one (never a path it names);
        a ``label`` text from any other route (batch inference) names a structure (``label_name``)."""
        from lib.server import UPLOADED_LABEL

        label = request.pop("label", None)
        request.pop("label_file", None)
        if UPLOADED_LABEL.get() and isinstance(label, str) and os.path.isfile(label):
            request["label_file"] = label
        elif isinstance(label, str) and label:
            request.setdefault("label_name", label)

    def _session_image(self, request: dict) -> str:
        """The image of the request's session when it is a real session of this server, else ""."""
        session = request.get("session")
        session_id = session.get("session_id") if isinstance(session, dict) else None
        if not valid_name(session_id) or self.sessions() is None:
            return ""
        info = self.sessions().get_session(session_id, update_ts=False)
        return info.image if info is not None and info.image == request.get("image") else ""

    def model_file(self, model, validate=True):
        """Weights are published only by the trainer: PUT /model/<name> (which asks validate=False) is refused."""
        if not validate:
            raise HTTPException(
                status_code=403,
                detail="model weights are published only by training (POST /train/medlam); uploading them is disabled",
            )
        return super().model_file(model, validate)

    def on_save_label(self, image_id, label_id):
        """A final label is a new template: rebuild the bank now, in the background, and adapt LiteMedSAM to the
        templates (trainer lite_medsam, queued behind any running training; it needs two templates)."""
        result = super().on_save_label(image_id, label_id)
        self._labels_changed()
        labelled = self._templates()  # the datastore's final labels, counted once per save
        if "lite_medsam" in self._trainers and conf_value(self.conf, "adapt_on_save") and labelled >= 2:
            self._queue_training("lite_medsam")
        if self._learning_due(labelled):
            self._learning_queued_at = labelled  # a training that does not publish is not asked again
            self._queue_training("segmentation")
        return result

    def _queue_training(self, name: str) -> None:
        """Queue trainer ``name`` behind any running training; saving a label never fails because it cannot."""
        try:
            self.async_training(name, enqueue=True)
        except Exception as exc:  # noqa: BLE001 - e.g. its queue is full (HTTP 429): the next save asks again
            logger.warning(f"training {name} not started: {getattr(exc, 'detail', exc)}")

    def _learning_due(self, labelled: int) -> bool:
        """`--conf learn_every` of the ``labelled`` final labels saved since those the learned model in use (or the
        last training asked for) saw; 3 at least."""
        from lib.trainers.segmentation import MIN_LABELS

        every = conf_value(self.conf, "learn_every")
        trainer = self._trainers.get("segmentation")
        if not every or trainer is None:
            return False
        seen = max(trainer.stats().get("labels", 0), getattr(self, "_learning_queued_at", 0))
        return labelled >= MIN_LABELS and labelled - seen >= every

    def _template_source(self) -> TemplateSource | None:
        """The template source of the `medlsam` model config (None when no config has one)."""
        for config in self.models.values():
            if isinstance(getattr(config, "templates", None), TemplateSource):
                return config.templates
        return None

    def _templates(self) -> int:
        """Labelled images of the datastore (adaptation needs two)."""
        source = self._template_source()
        return 0 if source is None else len(source.candidate_templates())

    def _organ_names(self) -> Dict[int, str]:
        """value -> organ name: the labels file and the names of the saved labels (they name a new label's values
        where its label_info does not)."""
        source = self._template_source()
        return {} if source is None else {value: name for name, value in source.label_names().items()}

    def _labels_changed(self) -> None:
        source = self._template_source()
        if source is not None:
            source.rebuild_in_background()


def get_class_of(qualified: str):
    module, _, name = qualified.rpartition(".")
    import importlib

    return getattr(importlib.import_module(module), name)
