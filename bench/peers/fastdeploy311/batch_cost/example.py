example = [{"text": "hello", "id": 1}]
