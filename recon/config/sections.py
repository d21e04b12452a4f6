"""The plain sections: where the data is, which prior, training, where slabs run (``runner``)
and MLflow (``tracking``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from recon.config.base import Section
from recon.config.prior import CheckpointError, PriorConfig, SliceSource, load_prior_config


# -- data -------------------------------------------------------------------------------------
class DataConfig(SliceSource, Section):
    """Where the volumes are and how slices are cut from them (the manifest, slicing and split
    fields are the prior's, ``recon.config.prior.SliceSource``; the pipeline's defaults are the
    native prior's: the native grid, foreground normalisation)."""

    image_size: int | None = Field(None, ge=8, le=1024, description="slices are resized to "
                                   "image_size^2; null: the native in-plane grid, untouched")
    normalise: Literal["percentile", "foreground"] = Field(
        "foreground", description="intensity scaling: head median -> 0.5 (the native prior's) "
        "or percentile (0.5/99.5 -> [0, 1], prior_64's)")
    data_root: Path = Path("data/public")
    materialise: bool = Field(True, description="materialise the offline public data when missing")
    test_split: str = "test"
    max_slices: int | None = Field(None, ge=1, le=4096, strict=True,
                                   description="central slices kept per test volume (None: all)")
    volumes: list[str] | None = Field(None, description="ids of the test volumes to reconstruct "
                                      "(None: every volume of test_split)")
    max_volumes: int | None = Field(None, ge=1, le=100_000, strict=True,
                                    description="test volumes reconstructed (None: all)")


# -- prior and training -----------------------------------------------------------------------
class PriorSection(Section):
    """The trained prior used for reconstruction."""

    checkpoint: Path = Path("checkpoints/prior_native.pt")
    config: Path | None = Field(Path("configs/prior_native.yaml"),
                                description="network/diffusion config the checkpoint must match")
    weights: Literal["ema", "model"] = "ema"

    def expected(self) -> PriorConfig | None:
        """The prior config the checkpoint must match (``None`` when ``config`` is unset)."""
        if self.config is None:
            return None
        try:
            return load_prior_config(self.config)
        except FileNotFoundError:
            raise CheckpointError(f"prior config not found: {self.config}") from None
        except ValueError as err:
            raise CheckpointError(f"invalid prior config {self.config}: {err}") from None


class TrainSection(Section):
    """Training the prior (``recon.prior.training.train_prior``); disabled: the shipped checkpoint."""

    enabled: bool = False
    steps: int | None = Field(None, ge=1, le=10_000_000, strict=True,
                              description="override the prior config's steps")
    batch_size: int | None = Field(None, ge=1, le=4096, strict=True)
    lr: float | None = Field(None, gt=0, le=1.0)
    resume: bool = True
    skip_if_matching: bool = Field(True, description="skip training when the checkpoint already "
                                                     "holds weights trained with this config")


DASK_CLUSTER_CLASSES = frozenset({
    "distributed.LocalCluster", "dask.distributed.LocalCluster",
    *(f"dask_jobqueue.{n}Cluster" for n in ("SLURM", "PBS", "SGE", "LSF", "OAR", "HTCondor",
                                            "Moab")),
    "dask_kubernetes.KubeCluster", "dask_kubernetes.operator.KubeCluster",
    "dask_gateway.GatewayCluster", "coiled.Cluster",
    *(f"dask_cloudprovider.{m}" for m in ("aws.EC2Cluster", "aws.FargateCluster",
                                          "azure.AzureVMCluster", "gcp.GCPCluster")),
})
"""The cluster classes ``runner.cluster_class`` may name: a config value is imported and called,
so it may name a known Dask cluster class and nothing else (never, say, ``subprocess.Popen``)."""

DASK_ADDRESS = r"^(tcp|tls|ucx|ws|wss)://[A-Za-z0-9._\-\[\]:]+:[0-9]{1,5}$"


class RunnerSection(Section):
    """Where the slabs of a reconstruction run (``pipelines.runners``): ``local`` = Prefect's
    thread pool in the flow's process (``workers`` at a time); ``dask`` = ``prefect-dask`` on a
    new local ``dask.distributed`` cluster (``workers`` processes x ``threads_per_worker``), on
    the running cluster at ``address``, or on one ``cluster_class`` makes (e.g.
    ``dask_jobqueue.SLURMCluster``) with ``cluster_kwargs``, scaled by ``adapt_kwargs``."""

    kind: Literal["local", "dask"] = "local"
    workers: int = Field(1, ge=1, le=1024, strict=True, description="slabs at once (local: "
                         "threads; dask: worker processes of a new local cluster)")
    threads_per_worker: int = Field(1, ge=1, le=256, strict=True,
                                    description="dask local cluster: threads per worker")
    address: str | None = Field(None, description="dask: scheduler of a running cluster, "
                                "e.g. tcp://scheduler:8786")
    cluster_class: str | None = Field(None, description="dask: import path of a cluster class, "
                                      "e.g. dask_jobqueue.SLURMCluster")
    cluster_kwargs: dict[str, Any] = Field(default_factory=dict)
    adapt_kwargs: dict[str, Any] = Field(default_factory=dict, description="dask: "
                                         "cluster.adapt(**adapt_kwargs), e.g. {minimum: 0, maximum: 8}")

    @field_validator("cluster_class")
    @classmethod
    def _known_cluster(cls, v: str | None) -> str | None:
        if v is not None and v not in DASK_CLUSTER_CLASSES:
            raise ValueError(f"{v!r} is not a known Dask cluster class (a config value is never "
                             f"imported and run unless it is one of: "
                             f"{', '.join(sorted(DASK_CLUSTER_CLASSES))}); for another cluster, "
                             f"start it yourself and give its scheduler as runner.address")
        return v

    @field_validator("address")
    @classmethod
    def _scheduler_address(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(DASK_ADDRESS, v):
            raise ValueError(f"{v!r} is not a Dask scheduler address such as "
                             f"tcp://scheduler:8786 (protocol tcp, tls, ucx, ws or wss; host; port)")
        return v

    @model_validator(mode="after")
    def _one_cluster(self) -> RunnerSection:
        if self.kind != "dask" and (self.address or self.cluster_class or self.cluster_kwargs
                                    or self.adapt_kwargs):
            raise ValueError("address, cluster_class, cluster_kwargs and adapt_kwargs need kind: dask")
        if self.address and (self.cluster_class or self.cluster_kwargs or self.adapt_kwargs):
            raise ValueError("give either address (a running cluster) or cluster_class/"
                             "cluster_kwargs/adapt_kwargs (a new one), not both")
        return self


class TrackingSection(Section):
    """MLflow: ``uri`` None -> ``sqlite:///<work_dir>/mlflow.db`` unless MLFLOW_TRACKING_URI is set."""

    uri: str | None = None
    experiment: str = "recon"
    artifact_root: Path | None = Field(None, description="default <work_dir>/mlartifacts")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is not None and v.startswith("file:"):
            raise ValueError("file: tracking stores are refused by MLflow 3; use "
                             "sqlite:///path/to/mlflow.db or an http(s):// server")
        return v
