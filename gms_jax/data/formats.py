"""The image file formats every reader accepts (dataset folders, ``predict``), in one place."""

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")  # any case
