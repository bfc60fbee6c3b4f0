"""Adapter storage formats: conversion of engine adapters to and from files others can read."""
