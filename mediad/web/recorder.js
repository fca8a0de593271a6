// Recording from the microphone as 16-bit PCM WAV, the input POST /records converts to MP3.
// MediaRecorder only makes compressed formats (WebM/Opus), so samples are captured with an
// AudioWorklet (a file of its own: the page's CSP allows no inline or blob: scripts).

export function canRecord() {
  return Boolean(navigator.mediaDevices && navigator.mediaDevices.getUserMedia && window.AudioWorkletNode);
}

export async function startRecording() {
  const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  const context = new AudioContext();
  try {
    await context.audioWorklet.addModule("/web/recorder-worklet.js");
  } catch (err) {
    stream.getTracks().forEach((track) => track.stop());
    await context.close();
    throw err;
  }
  const source = context.createMediaStreamSource(stream);
  // No outputs: the node is processed as long as it has input, nothing reaches the speakers.
  const node = new AudioWorkletNode(context, "mediad-capture", { numberOfOutputs: 0 });
  const blocks = [];
  node.port.onmessage = (event) => blocks.push(event.data);
  source.connect(node);
  const started = performance.now();
  return {
    elapsed: () => (performance.now() - started) / 1000,
    async stop() {
      source.disconnect();
      node.port.onmessage = null;
      stream.getTracks().forEach((track) => track.stop());
      const rate = context.sampleRate;
      await context.close();
      return encodeWav(blocks, rate);
    },
  };
}

// Mono 16-bit little-endian PCM in a RIFF/WAVE container.
export function encodeWav(blocks, sampleRate) {
  const samples = blocks.reduce((sum, block) => sum + block.length, 0);
  const buffer = new ArrayBuffer(44 + samples * 2);
  const view = new DataView(buffer);
  const text = (offset, value) => [...value].forEach((ch, i) => view.setUint8(offset + i, ch.charCodeAt(0)));
  text(0, "RIFF");
  view.setUint32(4, 36 + samples * 2, true);
  text(8, "WAVE");
  text(12, "fmt ");
  view.setUint32(16, 16, true); // fmt chunk size
  view.setUint16(20, 1, true); // PCM
  view.setUint16(22, 1, true); // mono
  view.setUint32(24, sampleRate, true);
  view.setUint32(28, sampleRate * 2, true); // byte rate
  view.setUint16(32, 2, true); // block align
  view.setUint16(34, 16, true); // bits per sample
  text(36, "data");
  view.setUint32(40, samples * 2, true);
  let offset = 44;
  for (const block of blocks) {
    for (const sample of block) {
      const clipped = Math.max(-1, Math.min(1, sample));
      view.setInt16(offset, clipped < 0 ? clipped * 0x8000 : clipped * 0x7fff, true);
      offset += 2;
    }
  }
  return new Blob([buffer], { type: "audio/wav" });
}
