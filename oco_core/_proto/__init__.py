"""Generated from proto/oco by tools/gen_proto.py; do not edit."""
