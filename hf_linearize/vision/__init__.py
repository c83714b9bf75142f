"""Vision support for the recipes: image-classification data (Hub, image folders, offline MNIST digits), timm
transforms and models, and classification metrics. The core library never imports this package."""
