//! The recurrence on autodiff devices: the inner backend runs the forward pass and
//! keeps what the backward pass needs; the backward pass is
//! [`GruBackend::gru_backward`] plus two matmul-sized reductions for the recurrent
//! weights, instead of autodiff's graph of every step's operations.

use burn::backend::AutodiffBackend;
use burn::backend::TensorMetadata;
use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::tensor::{Shape, Slice};

use super::{GruBackend, GruGradients};

#[derive(Debug)]
struct GruSequenceBackward;

/// The forward pass's `saved`, the initial state and the recurrent kernel.
type State<B> = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

impl<B: GruBackend> Backward<B, 4> for GruSequenceBackward {
    type State = State<B>;

    fn backward(self, ops: Ops<State<B>, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_proj, h0_node, kernel_node, bias_node] = ops.parents;
        let (saved, h0, recurrent_kernel) = ops.state;
        let d_states = grads.consume::<B>(&ops.node);
        let [_, steps, batch, h] = saved.shape().dims();
        let d = B::gru_backward(saved.clone(), h0.clone(), recurrent_kernel, d_states);
        if let Some(node) = x_proj {
            grads.register::<B>(node.id, d.x_proj);
        }
        if let Some(node) = h0_node {
            grads.register::<B>(node.id, d.h0);
        }
        let d_h_proj = B::float_reshape(d.h_proj, Shape::new([steps * batch, 3 * h]));
        if let Some(node) = kernel_node {
            // Every step's previous state, [steps · batch, h]: h0, then h'_0 … h'_{T−2}.
            let earlier = B::float_slice(saved, &[Slice::from(0..1), Slice::from(0..steps - 1)]);
            let earlier = B::float_reshape(earlier, Shape::new([(steps - 1) * batch, h]));
            let previous = B::float_cat(vec![h0, earlier], 0);
            let grad = B::float_matmul(B::float_transpose(previous), d_h_proj.clone());
            grads.register::<B>(node.id, grad);
        }
        if let Some(node) = bias_node {
            grads.register::<B>(node.id, B::float_sum_dim(d_h_proj, 0));
        }
    }
}

/// An output that no gradient flows through.
fn constant<B: GruBackend, C: CheckpointStrategy>(
    tensor: FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>> {
    Autodiff::<B, C>::from_inner(tensor)
}

impl<B: GruBackend, C: CheckpointStrategy> GruBackend for Autodiff<B, C> {
    fn gru_sequence(
        x_proj: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        recurrent_kernel: FloatTensor<Self>,
        recurrent_bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let parents = [
            x_proj.node(),
            h0.node(),
            recurrent_kernel.node(),
            recurrent_bias.node(),
        ];
        let saved = B::gru_forward(
            x_proj.into_primitive(),
            h0.primitive().clone(),
            recurrent_kernel.primitive().clone(),
            recurrent_bias.into_primitive(),
        );
        let [_, steps, batch, hidden] = saved.shape().dims();
        let states = B::float_reshape(
            B::float_slice(saved.clone(), &[Slice::from(0..1)]),
            Shape::new([steps, batch, hidden]),
        );
        match GruSequenceBackward
            .prepare::<C>(parents)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(
                (
                    saved,
                    h0.into_primitive(),
                    recurrent_kernel.into_primitive(),
                ),
                states,
            ),
            OpsKind::UnTracked(prep) => prep.finish(states),
        }
    }

    fn gru_forward(
        x_proj: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        recurrent_kernel: FloatTensor<Self>,
        recurrent_bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        constant::<B, C>(B::gru_forward(
            x_proj.into_primitive(),
            h0.into_primitive(),
            recurrent_kernel.into_primitive(),
            recurrent_bias.into_primitive(),
        ))
    }

    fn gru_backward(
        saved: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        recurrent_kernel: FloatTensor<Self>,
        d_states: FloatTensor<Self>,
    ) -> GruGradients<Self> {
        let d = B::gru_backward(
            saved.into_primitive(),
            h0.into_primitive(),
            recurrent_kernel.into_primitive(),
            d_states.into_primitive(),
        );
        GruGradients {
            x_proj: constant::<B, C>(d.x_proj),
            h_proj: constant::<B, C>(d.h_proj),
            h0: constant::<B, C>(d.h0),
        }
    }
}
