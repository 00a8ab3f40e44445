"""Peak RSS per process (supervisor, API server, loop) while one large JSON input goes through /sync on the echo recipe.

Usage: MB=90 python bench/large_input_rss.py PYTHON   (PYTHON: the interpreter whose fastdeploy to measure)
"""
import json, os, shutil, subprocess, sys, tempfile, threading, time, urllib.request
py = sys.argv[1]
port = 18700 + int(time.time()) % 200
rec = tempfile.mkdtemp(); shutil.copytree(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'recipes', 'echo'), rec + '/echo')
env = {k: v for k, v in os.environ.items() if not k.startswith('FASTDEPLOY_')}
env.update({'FASTDEPLOY_MAX_BODY_MB': '200', 'WORKERS': '1', 'FASTDEPLOY_HTTP_PROCESSES': '1', 'BATCH_SIZE': '1'})
proc = subprocess.Popen([py, '-m', 'fastdeploy', 'run', rec + '/echo', '--host', '127.0.0.1', '--port', str(port)],
                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd='/tmp', start_new_session=True)
def tree(pid):
    out = subprocess.run(['pgrep', '-P', str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [q for c in out for q in tree(int(c))]
def rss(pid):
    try:
        for line in open(f'/proc/{pid}/status'):
            if line.startswith('VmRSS'): return int(line.split()[1]) / 1024
    except OSError: return 0
    return 0
for _ in range(300):
    try:
        if urllib.request.urlopen(f'http://127.0.0.1:{port}/ready', timeout=1).status == 200: break
    except Exception: time.sleep(0.1)
idle = {p: rss(p) for p in tree(proc.pid)}
peak = dict(idle); stop = False
def sample():
    while not stop:
        for p in tree(proc.pid):
            peak[p] = max(peak.get(p, 0), rss(p))
        time.sleep(0.005)
t = threading.Thread(target=sample); t.start()
body = json.dumps({"data": ["x" * (int(os.environ.get("MB", "90")) * 1024 * 1024)]}).encode()
t0 = time.time()
r = urllib.request.urlopen(urllib.request.Request(f'http://127.0.0.1:{port}/sync', data=body, headers={'Content-Type': 'application/json'}), timeout=120)
ans = r.read(); took = time.time() - t0
time.sleep(0.3); stop = True; t.join()
print(py, 'status', r.status, 'answer MB %.0f' % (len(ans) / 2**20), 'took %.1fs' % took)
def role(p):
    try:
        a = open(f'/proc/{p}/cmdline','rb').read()
    except OSError:
        return '?'
    return 'api' if b'_api' in a else 'loop' if b'_loop' in a else 'sup'
print('  idle total %.0f MB, peak sum %.0f MB' % (sum(idle.values()), sum(peak.values())), {role(p): round(v) for p, v in peak.items()})

os.killpg(proc.pid, 15); proc.wait()
