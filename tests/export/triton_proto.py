"""Triton's ModelConfig protobuf messages, built at test time with ``descriptor_pb2`` (no protoc needed).

Transcribed from triton-inference-server/common ``protobuf/model_config.proto`` (package ``inference``): the
messages and fields ``config.pbtxt`` files written by llmkiln may use, with their real field numbers and enum
values. Parsing with ``text_format.Parse`` against these types is strict: an unknown field, a wrong enum name
or a wrong value type is an error, as it is when Triton itself reads the file.
"""
from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

F = descriptor_pb2.FieldDescriptorProto
_POOL = None


def _field(msg, name, number, ftype, label=F.LABEL_OPTIONAL, type_name=None):
    f = msg.field.add(name=name, number=number, type=ftype, label=label)
    if type_name:
        f.type_name = type_name


def _enum(parent, name, values):
    e = parent.enum_type.add(name=name)
    for n, v in values:
        e.value.add(name=n, number=v)


def _build_pool():
    fdp = descriptor_pb2.FileDescriptorProto(name="model_config_subset.proto", package="inference", syntax="proto3")
    _enum(fdp, "DataType", [("TYPE_INVALID", 0), ("TYPE_BOOL", 1), ("TYPE_UINT8", 2), ("TYPE_UINT16", 3),
                            ("TYPE_UINT32", 4), ("TYPE_UINT64", 5), ("TYPE_INT8", 6), ("TYPE_INT16", 7),
                            ("TYPE_INT32", 8), ("TYPE_INT64", 9), ("TYPE_FP16", 10), ("TYPE_FP32", 11),
                            ("TYPE_FP64", 12), ("TYPE_STRING", 13), ("TYPE_BF16", 14)])
    ig = fdp.message_type.add(name="ModelInstanceGroup")
    _enum(ig, "Kind", [("KIND_AUTO", 0), ("KIND_GPU", 1), ("KIND_CPU", 2), ("KIND_MODEL", 3)])
    _field(ig, "name", 1, F.TYPE_STRING)
    _field(ig, "kind", 4, F.TYPE_ENUM, type_name=".inference.ModelInstanceGroup.Kind")
    _field(ig, "count", 2, F.TYPE_INT32)
    _field(ig, "gpus", 3, F.TYPE_INT32, F.LABEL_REPEATED)
    _field(ig, "profile", 5, F.TYPE_STRING, F.LABEL_REPEATED)
    _field(ig, "passive", 7, F.TYPE_BOOL)
    _field(ig, "host_policy", 9, F.TYPE_STRING)
    inp = fdp.message_type.add(name="ModelInput")
    _field(inp, "name", 1, F.TYPE_STRING)
    _field(inp, "data_type", 2, F.TYPE_ENUM, type_name=".inference.DataType")
    _field(inp, "dims", 4, F.TYPE_INT64, F.LABEL_REPEATED)
    _field(inp, "is_shape_tensor", 6, F.TYPE_BOOL)
    _field(inp, "allow_ragged_batch", 7, F.TYPE_BOOL)
    _field(inp, "optional", 8, F.TYPE_BOOL)
    out = fdp.message_type.add(name="ModelOutput")
    _field(out, "name", 1, F.TYPE_STRING)
    _field(out, "data_type", 2, F.TYPE_ENUM, type_name=".inference.DataType")
    _field(out, "dims", 3, F.TYPE_INT64, F.LABEL_REPEATED)
    _field(out, "label_filename", 4, F.TYPE_STRING)
    _field(out, "is_shape_tensor", 6, F.TYPE_BOOL)
    mc = fdp.message_type.add(name="ModelConfig")
    entry = mc.nested_type.add(name="CcModelFilenamesEntry")
    entry.options.map_entry = True
    _field(entry, "key", 1, F.TYPE_STRING)
    _field(entry, "value", 2, F.TYPE_STRING)
    _field(mc, "name", 1, F.TYPE_STRING)
    _field(mc, "platform", 2, F.TYPE_STRING)
    _field(mc, "backend", 17, F.TYPE_STRING)
    _field(mc, "runtime", 25, F.TYPE_STRING)
    _field(mc, "max_batch_size", 4, F.TYPE_INT32)
    _field(mc, "input", 5, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".inference.ModelInput")
    _field(mc, "output", 6, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".inference.ModelOutput")
    _field(mc, "instance_group", 7, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".inference.ModelInstanceGroup")
    _field(mc, "default_model_filename", 8, F.TYPE_STRING)
    _field(mc, "cc_model_filenames", 9, F.TYPE_MESSAGE, F.LABEL_REPEATED,
           ".inference.ModelConfig.CcModelFilenamesEntry")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return pool


def parse_model_config(text: str):
    """Parse config.pbtxt text into an ``inference.ModelConfig`` message (strict)."""
    global _POOL
    if _POOL is None:
        _POOL = _build_pool()
    cls = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("inference.ModelConfig"))
    msg = cls()
    text_format.Parse(text, msg)
    return msg


def enum_name(msg, field: str) -> str:
    return msg.DESCRIPTOR.fields_by_name[field].enum_type.values_by_number[getattr(msg, field)].name
