"""The anytime model: frozen timm ViT, accumulator adapters and exit heads.

Nothing here knows Flower; conversion to Flower records happens in client_app
and server_app. Submodules are imported explicitly (no re-exports) so that a
light import such as `core.naming` never pulls in torch.
"""
